"""Mamba-2 language-model configs of Hugging Face and mamba_ssm -> the zoo's description (Mamba2LM's fields).

    fields_from_hf_config(config_json)    # refuses (naming it) what the zoo cannot build
    fields_from_ssm_config(config)        # (Mamba2LM.hf_config() / .mamba_ssm_config() go back)

Every upstream option is either mapped onto a zoo argument, accepted because it only affects
initialisation or speed, or refused with an error naming it (docs/interop.md has the table).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

HF, SSM = "hf", "mamba_ssm"
FORMAT_NAMES = {HF: "Hugging Face Mamba2ForCausalLM", SSM: "mamba_ssm MambaLMHeadModel"}
SSM_MLP_MULTIPLE = 128  # mamba_ssm's GatedMLP rounds its hidden width up to a multiple of this


class UnsupportedOptionError(ValueError):
    """An upstream option (or zoo model feature) that the other side cannot represent; the message names it."""


def detect_format(config: Mapping[str, Any]) -> str:
    """"hf" or "mamba_ssm" from a config.json's keys (ValueError when it is neither)."""
    if config.get("model_type") == "mamba2":
        return HF
    if "d_model" in config and "n_layer" in config:
        return SSM
    raise ValueError("config.json is neither a Hugging Face Mamba2 config (model_type 'mamba2') nor a mamba_ssm "
                     f"MambaConfig (d_model, n_layer, ssm_cfg); got keys {', '.join(sorted(config))}")


# The zoo Mamba2 arguments a Mamba2LM.mixer may hold, at the zoo's defaults.
MIXER_DEFAULTS = dict(state_dim=64, expand=2, head_dim=64, num_groups=1, conv_kernel=4, chunk_size=64,
                      dt_min=1e-3, dt_max=0.1, dt_limit=None, gated_norm=True, norm_before_gate=False,
                      norm_eps=1e-5, conv_bias=True, bias=False, D_per_channel=False, ssm_dim=None)


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


def fields_from_hf_config(c: dict[str, Any]) -> dict[str, Any]:
    """Mamba2LM's fields from a Hugging Face Mamba2Config (its config.json as a dict)."""
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
    mixer = {k: v for k, v in mixer.items() if v != MIXER_DEFAULTS[k]}
    return dict(vocab_size=c["vocab_size"], dim=c["hidden_size"], num_layers=c["num_hidden_layers"],
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


def fields_from_ssm_config(c: dict[str, Any]) -> dict[str, Any]:
    """Mamba2LM's fields from a mamba_ssm MambaConfig (as a dict)."""
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
    mixer = {k: v for k, v in mixer.items() if v != MIXER_DEFAULTS[k]}
    return dict(vocab_size=vocab, dim=c["d_model"], num_layers=c["n_layer"], mixer=mixer,
                norm="rmsnorm" if c["rms_norm"] else "layernorm", norm_eps=1e-5,
                residual_in_fp32=bool(c["residual_in_fp32"]), tie_embeddings=bool(c["tie_embeddings"]),
                mlp_hidden=mlp_hidden)
