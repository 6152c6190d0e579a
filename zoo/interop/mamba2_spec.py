"""A Mamba-2 language model in the upstream layout, described with the zoo's arguments (Mamba2LM).

Both upstream models (mamba_ssm's MambaLMHeadModel, Hugging Face's Mamba2ForCausalLM) are:
embedding -> n_layer x [x + Mamba2(norm(x))] -> norm_f -> lm_head. The zoo builds that as a
`CausalLM` whose Stack holds `ResidualBlock(mixer=Mamba2, mlp=None, norm="rmsnorm")` layers
(mamba_ssm's `d_intermediate > 0` adds a gated MLP, zoo `SwiGLU`).

    spec = Mamba2LM.from_hf_config(config_json)   # or .from_mamba_ssm_config(config), .from_model(model)
    model = spec.build();  print(spec.gin_config());  spec.hf_config();  spec.mamba_ssm_config()
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping

from torch import nn

from blocks.mamba2 import Mamba2
from blocks.mlp import SwiGLU
from blocks.norms import NORMS
from blocks.residual_block import ResidualBlock
from zoo.interop.mamba2_config import (FORMAT_NAMES, HF, MIXER_DEFAULTS, SSM, SSM_MLP_MULTIPLE, UnsupportedOptionError,
                                       fields_from_hf_config, fields_from_ssm_config)
from zoo.models import CausalLM
from zoo.stack import Stack


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
        return cls(**fields_from_hf_config(dict(config)))

    @classmethod
    def from_mamba_ssm_config(cls, config: Mapping[str, Any]) -> "Mamba2LM":
        """From a mamba_ssm MambaConfig (as a dict, or the dataclass itself)."""
        if dataclasses.is_dataclass(config):
            config = dataclasses.asdict(config)
        return cls(**fields_from_ssm_config(dict(config)))

    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face Mamba2Config (config.json) of this model; refuses what HF cannot represent."""
        m = {**MIXER_DEFAULTS, **self.mixer}
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
        m = {**MIXER_DEFAULTS, **self.mixer}
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


def _int_expand(expand: float, dim: int, fmt: str) -> int:
    if expand != int(expand):
        raise UnsupportedOptionError(f"cannot export to {FORMAT_NAMES[fmt]}: Mamba2 expand={expand} "
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
    mixer_kwargs = {k: v for k, v in spec.items() if v != MIXER_DEFAULTS[k]}
    return dict(mixer=mixer_kwargs, norm=norm, norm_eps=layer.norm1.eps, residual_in_fp32=layer.residual_in_fp32,
                mlp_hidden=mlp_hidden)

