"""Mamba-2 language-model checkpoints of mamba_ssm and Hugging Face transformers, in and out of the zoo.

    model = load_mamba2("ckpt/")                        # either format, told apart by its config.json
    model = load_hf_mamba2("ckpt/")                     # Mamba2ForCausalLM: config.json + *.safetensors
    model = load_mamba_ssm("ckpt/")                     # MambaLMHeadModel: config.json + pytorch_model.bin
    model = load_mamba_ssm(state_dict, config={...})    # or its state dict and config (a dict or MambaConfig)
    save_hf_mamba2(model, "out_hf/");  save_mamba_ssm(model, "out_ssm/")
    spec = Mamba2LM.from_model(model);  print(spec.gin_config())   # the same model as a gin config

Both upstream models are: embedding -> n_layer x [x + Mamba2(norm(x))] -> norm_f -> lm_head. The
zoo builds that as a `CausalLM` whose Stack holds `ResidualBlock(mixer=Mamba2, mlp=None,
norm="rmsnorm")` layers (mamba_ssm's `d_intermediate > 0` adds a gated MLP, zoo `SwiGLU`). Every
upstream option is either mapped onto a zoo argument, accepted because it only affects
initialisation or speed, or refused with an error naming it (docs/interop.md has the table).

Parameter names: the mixer's are the upstream ones (in_proj, conv1d, dt_bias, A_log, D, norm,
out_proj); around it

    zoo                          Hugging Face                    mamba_ssm
    embed.weight                 backbone.embeddings.weight      backbone.embedding.weight
    stack.layers.i.norm1.*       backbone.layers.i.norm.*        backbone.layers.i.norm.*
    stack.layers.i.mixer.*       backbone.layers.i.mixer.*       backbone.layers.i.mixer.*
    stack.layers.i.norm2.*       -                               backbone.layers.i.norm2.*
    stack.layers.i.mlp.w_gate_up -                               backbone.layers.i.mlp.fc1 (halves swapped)
    stack.layers.i.mlp.w_down    -                               backbone.layers.i.mlp.fc2
    norm.*                       backbone.norm_f.*               backbone.norm_f.*
    head.weight (untied only)    lm_head.weight                  lm_head.weight
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from blocks.mamba2 import Mamba2
from blocks.mlp import SwiGLU
from blocks.norms import NORMS
from blocks.residual_block import ResidualBlock
from zoo.models import CausalLM
from zoo.stack import Stack

HF, SSM = "hf", "mamba_ssm"
_FORMAT_NAMES = {HF: "Hugging Face Mamba2ForCausalLM", SSM: "mamba_ssm MambaLMHeadModel"}
SSM_MLP_MULTIPLE = 128  # mamba_ssm's GatedMLP rounds its hidden width up to a multiple of this


class UnsupportedOptionError(ValueError):
    """An upstream option (or zoo model feature) that the other side cannot represent; the message names it."""


# ----------------------------------------------------------------------------- the model description

@dataclass
class Mamba2LM:
    """A Mamba-2 language model in the upstream layout, described with the zoo's arguments.

    mixer: keyword arguments of blocks.mamba2.Mamba2 (besides dim). norm: "rmsnorm" or
    "layernorm", used by every block and the final norm, all with epsilon `norm_eps`.
    mlp_hidden: width of each block's gated MLP (0: no MLP, the Mamba-2 models' default).
    """

    vocab_size: int
    dim: int
    num_layers: int
    mixer: dict[str, Any] = field(default_factory=dict)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    mlp_hidden: int = 0

    # ------------------------------------------------------------------ zoo side
    def _mlp(self) -> partial | None:
        if not self.mlp_hidden:
            return None
        return partial(SwiGLU, hidden_mult=self.mlp_hidden / self.dim, multiple_of=SSM_MLP_MULTIPLE, bias=False)

    def build(self) -> CausalLM:
        """The zoo model (random weights), built from the plain classes (no gin bindings apply)."""
        block = partial(ResidualBlock, mixer=partial(Mamba2, **self.mixer), mlp=self._mlp(), norm=self.norm,
                        norm_eps=self.norm_eps, residual_in_fp32=self.residual_in_fp32)
        model = CausalLM(self.vocab_size, self.dim, stack=Stack(self.dim, [block] * self.num_layers),
                         ln_eps=self.norm_eps, norm=self.norm, tie_embeddings=self.tie_embeddings)
        if self.mlp_hidden and model.stack.layers[0].mlp.w_down.in_features != self.mlp_hidden:
            raise UnsupportedOptionError(f"d_intermediate={self.mlp_hidden} is not a multiple of {SSM_MLP_MULTIPLE}")
        return model

    def gin_config(self) -> str:
        """A gin config that builds this model with zoo.gin_config.build_model()."""
        lines = ["# A Mamba-2 language model in the layout of mamba_ssm's MambaLMHeadModel and Hugging Face's",
                 "# Mamba2ForCausalLM: pre-norm residual blocks (norm -> Mamba2 -> add), final norm, head.",
                 "build_model.model = @CausalLM",
                 f"CausalLM.vocab_size = {self.vocab_size}",
                 f"CausalLM.dim = {self.dim}",
                 "CausalLM.stack = @Stack",
                 f"CausalLM.norm = {self.norm!r}",
                 f"CausalLM.ln_eps = {self.norm_eps!r}",
                 f"CausalLM.tie_embeddings = {self.tie_embeddings}",
                 "Stack.layout = 'M'",
                 f"Stack.num_layers = {self.num_layers}",
                 "Stack.block = 'residual'",
                 f"ResidualBlock.norm = {self.norm!r}",
                 f"ResidualBlock.norm_eps = {self.norm_eps!r}",
                 f"ResidualBlock.residual_in_fp32 = {self.residual_in_fp32}"]
        if self.mlp_hidden:
            lines += ["ResidualBlock.mlp = @SwiGLU", f"SwiGLU.hidden_mult = {self.mlp_hidden / self.dim!r}",
                      f"SwiGLU.multiple_of = {SSM_MLP_MULTIPLE}", "SwiGLU.bias = False"]
        else:
            lines.append("ResidualBlock.mlp = None")
        lines += [f"Mamba2.{name} = {value!r}" for name, value in self.mixer.items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_model(cls, model: nn.Module) -> "Mamba2LM":
        """Describe a zoo CausalLM of identical ResidualBlock(Mamba2) layers; anything else is refused
        with an error naming what differs."""
        if not isinstance(model, CausalLM):
            raise UnsupportedOptionError(f"expected a zoo CausalLM; got {type(model).__name__}")
        layers = list(model.stack.layers)
        described = [_describe_layer(i, layer) for i, layer in enumerate(layers)]
        for i, d in enumerate(described[1:], start=1):
            if d != described[0]:
                diff = {k: (described[0][k], d[k]) for k in d if d[k] != described[0][k]}
                raise UnsupportedOptionError(
                    "the Mamba-2 formats need every layer alike; layer 0 and layer "
                    f"{i} differ in " + ", ".join(f"{k} ({a!r} vs {b!r})" for k, (a, b) in diff.items()))
        d = described[0]
        final = _norm_name(model.norm)
        if final is None:
            raise UnsupportedOptionError(f"the final norm must be one of {', '.join(NORMS)}; got "
                                         f"{type(model.norm).__name__}")
        if (final, model.norm.eps) != (d["norm"], d["norm_eps"]):
            raise UnsupportedOptionError(f"the final norm ({final}, eps={model.norm.eps}) must equal the blocks' "
                                         f"({d['norm']}, eps={d['norm_eps']}): upstream models have one setting for both")
        return cls(vocab_size=model.vocab_size, dim=model.dim, num_layers=len(layers), mixer=d["mixer"],
                   norm=d["norm"], norm_eps=d["norm_eps"], residual_in_fp32=d["residual_in_fp32"],
                   tie_embeddings=model.head is None, mlp_hidden=d["mlp_hidden"])

    # ------------------------------------------------------------------ upstream configs
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "Mamba2LM":
        """From a Hugging Face Mamba2Config (its config.json as a dict)."""
        return _from_hf_config(dict(config))

    @classmethod
    def from_mamba_ssm_config(cls, config: Mapping[str, Any]) -> "Mamba2LM":
        """From a mamba_ssm MambaConfig (as a dict, or the dataclass itself)."""
        if dataclasses.is_dataclass(config):
            config = dataclasses.asdict(config)
        return _from_ssm_config(dict(config))

    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face Mamba2Config (config.json) of this model; refuses what HF cannot represent."""
        m = {**_MIXER_DEFAULTS, **self.mixer}
        refuse = []
        if self.norm != "rmsnorm":
            refuse.append(f"norm={self.norm!r} (Hugging Face's Mamba2 uses RMSNorm)")
        if self.mlp_hidden:
            refuse.append("an MLP in each block (mamba_ssm's d_intermediate; Hugging Face's Mamba2 has none)")
        for name, default, upstream in (("gated_norm", True, "rmsnorm"), ("norm_before_gate", False, "norm_before_gate"),
                                        ("D_per_channel", False, "D_has_hdim"), ("ssm_dim", None, "d_ssm")):
            if m[name] != default:
                refuse.append(f"Mamba2 {name}={m[name]!r} (mamba_ssm's {upstream}; Hugging Face's Mamba2 lacks it)")
        if m["norm_eps"] != self.norm_eps:
            refuse.append(f"Mamba2 norm_eps={m['norm_eps']} differs from the block norms' eps={self.norm_eps} "
                          "(Hugging Face has one layer_norm_epsilon for both)")
        expand = _int_expand(m["expand"], self.dim, HF)
        if refuse:
            raise UnsupportedOptionError("cannot export to Hugging Face Mamba2: " + "; ".join(refuse))
        lo, hi = m["dt_limit"] or (0.0, None)
        return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
                "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.num_layers,
                "state_size": m["state_dim"], "expand": expand, "head_dim": m["head_dim"],
                "num_heads": expand * self.dim // m["head_dim"], "n_groups": m["num_groups"],
                "conv_kernel": m["conv_kernel"], "chunk_size": m["chunk_size"], "use_bias": m["bias"],
                "use_conv_bias": m["conv_bias"], "layer_norm_epsilon": self.norm_eps,
                "residual_in_fp32": self.residual_in_fp32, "tie_word_embeddings": self.tie_embeddings,
                "time_step_limit": [lo, math.inf if hi is None else hi], "time_step_min": m["dt_min"],
                "time_step_max": m["dt_max"], "hidden_act": "silu"}

    def mamba_ssm_config(self) -> dict[str, Any]:
        """The mamba_ssm MambaConfig (as a dict) of this model; refuses what mamba_ssm cannot represent."""
        m = {**_MIXER_DEFAULTS, **self.mixer}
        refuse = []
        if self.norm_eps != 1e-5:
            refuse.append(f"norm eps={self.norm_eps} (mamba_ssm's MambaConfig fixes the block norms' epsilon at 1e-5)")
        if m["norm_eps"] != 1e-5:
            refuse.append(f"Mamba2 norm_eps={m['norm_eps']} (mamba_ssm fixes the gated norm's epsilon at 1e-5)")
        if self.mlp_hidden % SSM_MLP_MULTIPLE:
            refuse.append(f"MLP width {self.mlp_hidden} (mamba_ssm rounds d_intermediate up to a multiple of "
                          f"{SSM_MLP_MULTIPLE})")
        expand = _int_expand(m["expand"], self.dim, SSM)
        if refuse:
            raise UnsupportedOptionError("cannot export to mamba_ssm: " + "; ".join(refuse))
        lo, hi = m["dt_limit"] or (0.0, None)
        ssm_cfg = {"layer": "Mamba2", "d_state": m["state_dim"], "d_conv": m["conv_kernel"], "expand": expand,
                   "headdim": m["head_dim"], "d_ssm": m["ssm_dim"], "ngroups": m["num_groups"],
                   "D_has_hdim": m["D_per_channel"], "rmsnorm": m["gated_norm"],
                   "norm_before_gate": m["norm_before_gate"], "dt_min": m["dt_min"], "dt_max": m["dt_max"],
                   "dt_limit": [lo, math.inf if hi is None else hi], "bias": m["bias"],
                   "conv_bias": m["conv_bias"], "chunk_size": m["chunk_size"]}
        return {"d_model": self.dim, "d_intermediate": self.mlp_hidden, "n_layer": self.num_layers,
                "vocab_size": self.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
                "rms_norm": self.norm == "rmsnorm", "residual_in_fp32": self.residual_in_fp32,
                "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": self.tie_embeddings}


# The zoo Mamba2 arguments a Mamba2LM.mixer may hold, at the zoo's defaults.
_MIXER_DEFAULTS = dict(state_dim=64, expand=2, head_dim=64, num_groups=1, conv_kernel=4, chunk_size=64,
                       dt_min=1e-3, dt_max=0.1, dt_limit=None, gated_norm=True, norm_before_gate=False,
                       norm_eps=1e-5, conv_bias=True, bias=False, D_per_channel=False, ssm_dim=None)


def _int_expand(expand: float, dim: int, fmt: str) -> int:
    if expand != int(expand):
        raise UnsupportedOptionError(f"cannot export to {_FORMAT_NAMES[fmt]}: Mamba2 expand={expand} "
                                     "(d_inner / dim) must be an integer there")
    return int(expand)


def _norm_name(norm: nn.Module) -> str | None:
    for name, cls in NORMS.items():
        if type(norm) is cls and norm.weight is not None and (cls is not nn.LayerNorm or norm.bias is not None):
            return name
    return None


def _describe_layer(i: int, layer: nn.Module) -> dict[str, Any]:
    """What a layer must agree on with the others (or an error naming why it is not exportable)."""
    if not isinstance(layer, ResidualBlock):
        raise UnsupportedOptionError(f"layer {i} is a {type(layer).__name__}; the Mamba-2 formats need "
                                     "ResidualBlock(mixer=Mamba2) in every layer")
    mixer = layer.mixer
    if not isinstance(mixer, Mamba2):
        raise UnsupportedOptionError(f"layer {i}'s mixer is a {type(mixer).__name__}; the Mamba-2 formats hold "
                                     "Mamba2 mixers only")
    norm = _norm_name(layer.norm1)
    if norm is None:
        raise UnsupportedOptionError(f"layer {i}'s norm must be one of {', '.join(NORMS)}; got {type(layer.norm1).__name__}")
    mlp_hidden = 0
    if layer.mlp is not None:
        if not isinstance(layer.mlp, SwiGLU) or layer.mlp.w_down.bias is not None:
            raise UnsupportedOptionError(f"layer {i}'s MLP must be a SwiGLU without biases (mamba_ssm's GatedMLP); "
                                         f"got {type(layer.mlp).__name__}")
        mlp_hidden = layer.mlp.w_down.in_features
    expand = mixer.d_inner / mixer.dim
    spec = dict(state_dim=mixer.state_dim, expand=int(expand) if expand == int(expand) else expand,
                head_dim=mixer.head_dim, num_groups=mixer.num_groups, conv_kernel=mixer.conv_kernel,
                chunk_size=mixer.chunk_size, dt_limit=mixer.dt_limit, gated_norm=mixer.norm is not None,
                norm_before_gate=mixer.norm is not None and mixer.norm.norm_before_gate,
                norm_eps=mixer.norm.eps if mixer.norm is not None else 1e-5,
                conv_bias=mixer.conv1d.bias is not None, bias=mixer.in_proj.bias is not None,
                D_per_channel=mixer.D_per_channel, ssm_dim=None if mixer.d_ssm == mixer.d_inner else mixer.d_ssm)
    mixer_kwargs = {k: v for k, v in spec.items() if v != _MIXER_DEFAULTS[k]}
    return dict(mixer=mixer_kwargs, norm=norm, norm_eps=layer.norm1.eps, residual_in_fp32=layer.residual_in_fp32,
                mlp_hidden=mlp_hidden)


# ----------------------------------------------------------------------------- upstream configs -> Mamba2LM

def _dt_limit(value: Any, name: str) -> tuple[float, float | None] | None:
    """An upstream (lo, hi) time-step limit (JSON lists, Infinity, HF's {"__float__": "Infinity"}) -> zoo dt_limit."""
    def number(v: Any) -> float:
        if isinstance(v, Mapping) and "__float__" in v:
            v = v["__float__"]
        return float(v)

    try:
        lo, hi = (number(v) for v in value)
    except (TypeError, ValueError):
        raise UnsupportedOptionError(f"{name}={value!r} must be a pair (lo, hi) of numbers") from None
    if (lo, hi) == (0.0, math.inf):
        return None
    return (lo, None if hi == math.inf else hi)


def _check_positive_ints(config: dict[str, Any], names: tuple[str, ...], source: str) -> None:
    for name in names:
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: {name} must be a positive int; got {name}={value!r}")


# Fields of Hugging Face's Mamba2Config and what becomes of them (docs/interop.md has the same table).
HF_MAPPED = {"vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "head_dim", "num_heads",
             "n_groups", "conv_kernel", "chunk_size", "use_bias", "use_conv_bias", "layer_norm_epsilon",
             "residual_in_fp32", "tie_word_embeddings", "time_step_limit", "time_step_min", "time_step_max",
             "hidden_act"}
HF_INIT_ONLY = {"time_step_floor", "time_step_rank", "initializer_range", "rescale_prenorm_residual"}
HF_GENERIC = {"model_type", "architectures", "dtype", "torch_dtype", "transformers_version", "use_cache",
              "bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path", "output_hidden_states",
              "output_attentions", "return_dict", "is_encoder_decoder", "id2label", "label2id", "problem_type",
              "tokenizer_class", "prefix", "task_specific_params", "chunk_size_feed_forward", "is_decoder",
              "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size", "finetuning_task",
              "num_labels", "sep_token_id", "decoder_start_token_id", "pruned_heads", "torchscript",
              "_attn_implementation_autoset", "_commit_hash", "use_return_dict", "layer_types"}


def _from_hf_config(c: dict[str, Any]) -> Mamba2LM:
    src = "Hugging Face Mamba2 config"
    if c.get("model_type", "mamba2") != "mamba2":
        raise UnsupportedOptionError(f"{src}: model_type={c['model_type']!r}; only 'mamba2' (Mamba2ForCausalLM) loads here")
    defaults = dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                    num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8,
                    use_bias=False, use_conv_bias=True, hidden_act="silu", residual_in_fp32=True,
                    time_step_min=1e-3, time_step_max=0.1, time_step_limit=(0.0, math.inf), chunk_size=256,
                    tie_word_embeddings=False)  # Mamba2Config's defaults (transformers 5.x)
    c = {**defaults, **c}
    unknown = sorted(set(c) - HF_MAPPED - HF_INIT_ONLY - HF_GENERIC)
    if unknown:
        warnings.warn(f"{src}: ignoring keys that are not Mamba2Config options: {', '.join(unknown)}", stacklevel=3)
    if c["hidden_act"] != "silu":
        raise UnsupportedOptionError(f"{src}: hidden_act={c['hidden_act']!r} is not supported (Mamba2's conv "
                                     "activation is SiLU; only hidden_act='silu' loads)")
    _check_positive_ints(c, ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "head_dim",
                             "num_heads", "n_groups", "conv_kernel", "chunk_size"), src)
    d_inner = c["expand"] * c["hidden_size"]
    if c["num_heads"] * c["head_dim"] != d_inner:
        raise UnsupportedOptionError(f"{src}: num_heads={c['num_heads']} * head_dim={c['head_dim']} must equal "
                                     f"expand * hidden_size = {d_inner}")
    eps = float(c["layer_norm_epsilon"])
    mixer = dict(state_dim=c["state_size"], expand=c["expand"], head_dim=c["head_dim"], num_groups=c["n_groups"],
                 conv_kernel=c["conv_kernel"], chunk_size=c["chunk_size"],
                 dt_limit=_dt_limit(c["time_step_limit"], "time_step_limit"), norm_eps=eps,
                 conv_bias=bool(c["use_conv_bias"]), bias=bool(c["use_bias"]))
    if 0 < c["time_step_min"] <= c["time_step_max"]:  # init only: kept so that the gin config inits alike
        mixer.update(dt_min=float(c["time_step_min"]), dt_max=float(c["time_step_max"]))
    mixer = {k: v for k, v in mixer.items() if v != _MIXER_DEFAULTS[k]}
    return Mamba2LM(vocab_size=c["vocab_size"], dim=c["hidden_size"], num_layers=c["num_hidden_layers"],
                    mixer=mixer, norm="rmsnorm", norm_eps=eps, residual_in_fp32=bool(c["residual_in_fp32"]),
                    tie_embeddings=bool(c["tie_word_embeddings"]))


# mamba_ssm: MambaConfig's fields with their defaults, and Mamba2's constructor arguments with theirs.
SSM_CONFIG_DEFAULTS = dict(d_model=2560, d_intermediate=0, n_layer=64, vocab_size=50277, ssm_cfg={}, attn_layer_idx=[],
                           attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                           pad_vocab_size_multiple=8, tie_embeddings=True)
SSM_MIXER_DEFAULTS = dict(d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None, ngroups=1,
                          A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001,
                          dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, math.inf), bias=False, conv_bias=True,
                          chunk_size=256, use_mem_eff_path=True, layer_idx=None, process_group=None,
                          sequence_parallel=True, device=None, dtype=None)
SSM_INIT_ONLY = {"conv_init", "A_init_range", "dt_init_floor"}
SSM_SPEED_ONLY = {"use_mem_eff_path", "layer_idx", "sequence_parallel", "device", "dtype"}


def _from_ssm_config(c: dict[str, Any]) -> Mamba2LM:
    src = "mamba_ssm MambaConfig"
    unknown = sorted(set(c) - set(SSM_CONFIG_DEFAULTS))
    if unknown:
        raise UnsupportedOptionError(f"{src}: unknown fields {', '.join(unknown)} (MambaConfig has: "
                                     f"{', '.join(SSM_CONFIG_DEFAULTS)})")
    c = {**SSM_CONFIG_DEFAULTS, **c}
    _check_positive_ints(c, ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"), src)
    if c["attn_layer_idx"]:
        raise UnsupportedOptionError(f"{src}: attn_layer_idx={c['attn_layer_idx']} (mamba_ssm's MHA layers) is not "
                                     "supported; only pure Mamba-2 stacks load")
    ssm = dict(c["ssm_cfg"] or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer != "Mamba2":
        raise UnsupportedOptionError(f"{src}: ssm_cfg.layer={layer!r}; only 'Mamba2' loads (mamba_ssm's default, "
                                     "when ssm_cfg has no 'layer', is Mamba1)")
    unknown = sorted(set(ssm) - set(SSM_MIXER_DEFAULTS))
    if unknown:
        raise UnsupportedOptionError(f"{src}: ssm_cfg has unknown Mamba2 arguments {', '.join(unknown)}")
    s = {**SSM_MIXER_DEFAULTS, **ssm}
    if s["process_group"] is not None:
        raise UnsupportedOptionError(f"{src}: ssm_cfg.process_group (tensor-parallel shards) is not supported; "
                                     "load the full model")
    _check_positive_ints(s, ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"), src + " ssm_cfg")
    if c["d_intermediate"] < 0:
        raise ValueError(f"{src}: d_intermediate must be >= 0; got {c['d_intermediate']}")
    vocab = c["vocab_size"]
    vocab += -vocab % c["pad_vocab_size_multiple"]  # mamba_ssm pads the embedding and head
    mlp_hidden = -(-c["d_intermediate"] // SSM_MLP_MULTIPLE) * SSM_MLP_MULTIPLE
    mixer = dict(state_dim=s["d_state"], expand=s["expand"], head_dim=s["headdim"], num_groups=s["ngroups"],
                 conv_kernel=s["d_conv"], chunk_size=s["chunk_size"], dt_limit=_dt_limit(s["dt_limit"], "ssm_cfg.dt_limit"),
                 gated_norm=bool(s["rmsnorm"]), norm_before_gate=bool(s["norm_before_gate"]) and bool(s["rmsnorm"]),
                 conv_bias=bool(s["conv_bias"]), bias=bool(s["bias"]), D_per_channel=bool(s["D_has_hdim"]),
                 ssm_dim=None if s["d_ssm"] in (None, s["expand"] * c["d_model"]) else s["d_ssm"])
    if 0 < s["dt_min"] <= s["dt_max"]:  # init only: kept so that the gin config inits alike
        mixer.update(dt_min=float(s["dt_min"]), dt_max=float(s["dt_max"]))
    mixer = {k: v for k, v in mixer.items() if v != _MIXER_DEFAULTS[k]}
    return Mamba2LM(vocab_size=vocab, dim=c["d_model"], num_layers=c["n_layer"], mixer=mixer,
                    norm="rmsnorm" if c["rms_norm"] else "layernorm", norm_eps=1e-5,
                    residual_in_fp32=bool(c["residual_in_fp32"]), tie_embeddings=bool(c["tie_embeddings"]),
                    mlp_hidden=mlp_hidden)


# ----------------------------------------------------------------------------- parameter names

_LAYER = re.compile(r"^(?:stack|backbone)\.layers\.(\d+)\.(.*)$")
_ZOO_TO_UP_BLOCK = {"norm1.": "norm.", "norm2.": "norm2.", "mixer.": "mixer.", "mlp.w_gate_up.": "mlp.fc1.",
                    "mlp.w_down.": "mlp.fc2."}
_UP_TO_ZOO_BLOCK = {v: k for k, v in _ZOO_TO_UP_BLOCK.items()}


def _embedding_key(fmt: str) -> str:
    return "backbone.embeddings.weight" if fmt == HF else "backbone.embedding.weight"


def _zoo_to_upstream_key(key: str, fmt: str) -> str:
    if key == "embed.weight":
        return _embedding_key(fmt)
    if key.startswith("norm."):
        return "backbone.norm_f." + key[len("norm."):]
    if key == "head.weight":
        return "lm_head.weight"
    m = _LAYER.match(key)
    if m:
        for zoo, up in _ZOO_TO_UP_BLOCK.items():
            if m.group(2).startswith(zoo):
                return f"backbone.layers.{m.group(1)}.{up}{m.group(2)[len(zoo):]}"
    raise KeyError(f"no {_FORMAT_NAMES[fmt]} name for zoo parameter {key!r}")


def _upstream_to_zoo_key(key: str) -> str | None:
    """The zoo name of an upstream parameter (None: not one the zoo knows; reported as unexpected)."""
    if key in ("backbone.embeddings.weight", "backbone.embedding.weight"):
        return "embed.weight"
    if key.startswith("backbone.norm_f."):
        return "norm." + key[len("backbone.norm_f."):]
    if key == "lm_head.weight":
        return "head.weight"
    m = _LAYER.match(key)
    if m and key.startswith("backbone."):
        for up, zoo in _UP_TO_ZOO_BLOCK.items():
            if m.group(2).startswith(up):
                return f"stack.layers.{m.group(1)}.{zoo}{m.group(2)[len(up):]}"
    return None


def _swap_halves(weight: Tensor) -> Tensor:
    """mamba_ssm's fc1 rows are [value; gate], the zoo SwiGLU's [gate; value] (and back)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_upstream_state_dict(model: CausalLM, fmt: str) -> dict[str, Tensor]:
    """The zoo model's weights under the upstream names of `fmt` ("hf" or "mamba_ssm"). A tied head
    is left out for Hugging Face (it re-ties on load) and included for mamba_ssm (its state dict has it)."""
    out = {}
    for key, value in model.state_dict().items():
        up = _zoo_to_upstream_key(key, fmt)
        out[up] = _swap_halves(value) if ".mlp.fc1." in up else value
    if model.head is None and fmt == SSM:
        out["lm_head.weight"] = out[_embedding_key(fmt)]
    return out


def from_upstream_state_dict(state_dict: Mapping[str, Tensor], model: CausalLM, source: str) -> dict[str, Tensor]:
    """An upstream state dict -> the zoo model's names, checked against the model: every missing,
    unexpected or mis-shaped tensor is named (upstream names) in one error."""
    expected = model.state_dict()
    out, unexpected = {}, []
    tied_head = None
    for key, value in state_dict.items():
        zoo = _upstream_to_zoo_key(key)
        if zoo == "head.weight" and model.head is None:
            tied_head = value  # tied: must equal the embedding
            continue
        if zoo is None or zoo not in expected:
            unexpected.append(key)
            continue
        out[zoo] = _swap_halves(value) if ".mlp.w_gate_up." in zoo else value
    fmt = HF if "backbone.embeddings.weight" in state_dict else SSM
    missing = [_zoo_to_upstream_key(k, fmt) for k in expected if k not in out]
    shapes = [f"{_zoo_to_upstream_key(k, fmt)}: checkpoint {tuple(out[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in out if out[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match its config:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(sorted(unexpected))}")
        if shapes:
            lines.append(f"  shape mismatch ({len(shapes)}): " + "; ".join(shapes))
        raise ValueError("\n".join(lines))
    if tied_head is not None and not torch.equal(tied_head.to(out["embed.weight"].dtype), out["embed.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from the embedding but the config ties them "
                         "(tie_word_embeddings / tie_embeddings = true)")
    return out


def _load_into(spec: Mamba2LM, state_dict: Mapping[str, Tensor], source: str,
               dtype: torch.dtype | None, device: torch.device | str | None) -> CausalLM:
    with torch.device("meta"):
        model = spec.build()
    weights = from_upstream_state_dict(state_dict, model, source)
    model.load_state_dict(weights, strict=True, assign=True)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


# ----------------------------------------------------------------------------- files

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a checkpoint folder holds config.json and its weights)")
    with open(path) as f:
        return json.load(f)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors


def _read_weights(folder: Path) -> tuple[dict[str, Tensor], str]:
    """All tensors of a checkpoint folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                               ("pytorch_model.bin.index.json", lambda p: torch.load(p, map_location="cpu", weights_only=True))):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(_read_json(index)["weight_map"].values()))
            tensors = {}
            for name in files:
                tensors.update(reader(folder / name))
            return tensors, str(index)
    if (folder / "model.safetensors").is_file():
        return _read_safetensors(folder / "model.safetensors"), str(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    raise FileNotFoundError(f"{folder} holds no weights: expected model.safetensors, model.safetensors.index.json, "
                            "pytorch_model.bin or pytorch_model.bin.index.json")


def load_hf_mamba2(folder: str | Path, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> CausalLM:
    """A Hugging Face Mamba2ForCausalLM folder (config.json + safetensors or pytorch_model.bin) as a
    zoo CausalLM, in eval mode. dtype/device: convert (None keeps each tensor's stored dtype)."""
    folder = Path(folder)
    spec = Mamba2LM.from_hf_config(_read_json(folder / "config.json"))
    weights, source = _read_weights(folder)
    return _load_into(spec, weights, source, dtype, device)


def load_mamba_ssm(checkpoint: str | Path | Mapping[str, Tensor], config: Any = None,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> CausalLM:
    """A mamba_ssm MambaLMHeadModel as a zoo CausalLM, in eval mode: a folder (config.json +
    pytorch_model.bin, as its save_pretrained writes), or a state dict with `config` (a dict or a
    MambaConfig). dtype/device: convert (None keeps each tensor's stored dtype)."""
    if isinstance(checkpoint, Mapping):
        if config is None:
            raise ValueError("load_mamba_ssm(state_dict, config=...): a state dict needs its MambaConfig (dict)")
        weights, source = checkpoint, "mamba_ssm state dict"
    else:
        folder = Path(checkpoint)
        config = _read_json(folder / "config.json") if config is None else config
        weights, source = _read_weights(folder)
    return _load_into(Mamba2LM.from_mamba_ssm_config(config), weights, source, dtype, device)


def detect_format(config: Mapping[str, Any]) -> str:
    """"hf" or "mamba_ssm" from a config.json's keys (ValueError when it is neither)."""
    if config.get("model_type") == "mamba2":
        return HF
    if "d_model" in config and "n_layer" in config:
        return SSM
    raise ValueError("config.json is neither a Hugging Face Mamba2 config (model_type 'mamba2') nor a mamba_ssm "
                     f"MambaConfig (d_model, n_layer, ssm_cfg); got keys {', '.join(sorted(config))}")


def load_mamba2(folder: str | Path, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> CausalLM:
    """A Mamba-2 checkpoint folder in either format (told apart by its config.json) as a zoo CausalLM."""
    fmt = detect_format(_read_json(Path(folder) / "config.json"))
    return load_hf_mamba2(folder, dtype, device) if fmt == HF else load_mamba_ssm(folder, dtype=dtype, device=device)


def _prepare_folder(folder: str | Path, overwrite: bool) -> Path:
    folder = Path(folder)
    if (folder / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a config.json; pass overwrite=True to replace that checkpoint")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_hf_mamba2(model: CausalLM, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a zoo Mamba-2 model as a Hugging Face Mamba2ForCausalLM folder (config.json +
    model.safetensors), loadable with transformers' from_pretrained. Refuses (naming it) anything
    Hugging Face's Mamba2 cannot represent."""
    spec = Mamba2LM.from_model(model)
    config = spec.hf_config()
    config["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    weights = {k: v.detach().contiguous().cpu() for k, v in to_upstream_state_dict(model, HF).items()}
    folder = _prepare_folder(folder, overwrite)
    _atomic(folder / "model.safetensors", lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    _atomic(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def save_mamba_ssm(model: CausalLM, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a zoo Mamba-2 model as mamba_ssm's save_pretrained does (config.json +
    pytorch_model.bin), loadable with MambaLMHeadModel.from_pretrained. Refuses (naming it) anything
    mamba_ssm cannot represent."""
    config = Mamba2LM.from_model(model).mamba_ssm_config()
    weights = {k: v.detach().cpu() for k, v in to_upstream_state_dict(model, SSM).items()}
    folder = _prepare_folder(folder, overwrite)
    _atomic(folder / "pytorch_model.bin", lambda p: torch.save(weights, p))
    _atomic(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=4) + "\n"))
    return folder
