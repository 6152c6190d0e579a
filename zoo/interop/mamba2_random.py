"""Tiny random Mamba-2 checkpoints in the upstream layouts, for checking converters: `ssm_config` +
`ssm_state_dict` (mamba_ssm's MambaConfig and key layout) and `hf_model` (a transformers
Mamba2ForCausalLM, needs the `hf` extra). Every tensor is random (never zeros), so each one matters.
"""

from __future__ import annotations

import torch

from zoo.interop.mamba2_config import SSM_CONFIG_DEFAULTS


def ssm_config(d_model: int = 32, vocab_size: int = 61, **options) -> dict:
    """A tiny MambaConfig dict (every field written out, as mamba_ssm's save_pretrained does)."""
    options = dict(options)
    ssm = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8, **options.pop("ssm_cfg", {})}
    return {**SSM_CONFIG_DEFAULTS, "d_model": d_model, "n_layer": 2, "vocab_size": vocab_size, "ssm_cfg": ssm,
            "pad_vocab_size_multiple": 1, **options}


def ssm_state_dict(config: dict, dtype=torch.float64, seed=0) -> dict[str, torch.Tensor]:
    """Random weights under mamba_ssm's names and shapes for `config` (every tensor randomised)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    s = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "d_ssm": None, "ngroups": 1, "D_has_hdim": False,
         "rmsnorm": True, "bias": False, "conv_bias": True, **config["ssm_cfg"]}
    d_inner = s["expand"] * config["d_model"]
    d_ssm = s["d_ssm"] or d_inner
    H, GN = d_ssm // s["headdim"], s["ngroups"] * s["d_state"]
    vocab = config["vocab_size"] + -config["vocab_size"] % config["pad_vocab_size_multiple"]
    hidden = -(-config["d_intermediate"] // 128) * 128

    def norm(prefix):
        out = {prefix + "weight": r(config["d_model"], shift=1.0)}
        if not config["rms_norm"]:
            out[prefix + "bias"] = r(config["d_model"], scale=0.1)
        return out

    sd = {"backbone.embedding.weight": r(vocab, config["d_model"], scale=1.0)}
    for i in range(config["n_layer"]):
        p = f"backbone.layers.{i}."
        sd.update(norm(p + "norm."))
        m = p + "mixer."
        sd[m + "in_proj.weight"] = r(2 * d_inner + 2 * GN + H, config["d_model"])
        sd[m + "conv1d.weight"] = r(d_ssm + 2 * GN, 1, s["d_conv"], scale=0.5)
        if s["conv_bias"]:
            sd[m + "conv1d.bias"] = r(d_ssm + 2 * GN, scale=0.3)
        if s["bias"]:
            sd[m + "in_proj.bias"] = r(2 * d_inner + 2 * GN + H, scale=0.2)
            sd[m + "out_proj.bias"] = r(config["d_model"], scale=0.2)
        sd[m + "dt_bias"] = r(H, scale=0.8, shift=-1.5)
        sd[m + "A_log"] = torch.log(torch.empty(H, dtype=torch.float64).uniform_(1, 8, generator=g)).to(dtype)
        sd[m + "D"] = r(d_ssm if s["D_has_hdim"] else H, scale=1.0)
        if s["rmsnorm"]:
            sd[m + "norm.weight"] = r(d_ssm, shift=1.0)
        sd[m + "out_proj.weight"] = r(config["d_model"], d_inner, scale=0.4)
        if hidden:
            sd.update(norm(p + "norm2."))
            sd[p + "mlp.fc1.weight"] = r(2 * hidden, config["d_model"])
            sd[p + "mlp.fc2.weight"] = r(config["d_model"], hidden, scale=0.2)
    sd.update(norm("backbone.norm_f."))
    tied = config["tie_embeddings"]
    sd["lm_head.weight"] = sd["backbone.embedding.weight"] if tied else r(vocab, config["d_model"], scale=1.0)
    return sd


HF_BASE = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16, num_heads=4, n_groups=2,
               chunk_size=8, pad_token_id=0, bos_token_id=None, eos_token_id=None)


def hf_model(dtype=torch.float32, seed=0, **options):
    """A tiny transformers Mamba2ForCausalLM (HF_BASE + options) with every parameter randomised (so each
    one matters, and greedy outputs vary)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(Mamba2Config(**{**HF_BASE, **options})).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1, 8)))
            elif name.endswith("dt_bias"):
                p.copy_(torch.empty_like(p).uniform_(-3, 0))
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "embedding" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p))
            elif name.endswith("out_proj.weight"):  # strong mixers: greedy outputs vary, not just echo the embedding
                p.copy_(0.4 * torch.randn_like(p))
            else:
                p.add_(0.2 * torch.randn_like(p))
    return model
