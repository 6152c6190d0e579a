"""An independent, deliberately plain float64 model of the upstream Mamba-2 language models, the
yardstick of the checkpoint converters (tests and tools/interop_parity.py): mamba_ssm's
MambaLMHeadModel (modules/mamba2.py, modules/block.py, models/mixer_seq_simple.py) and Hugging
Face's Mamba2ForCausalLM, computed straight from their state dicts with a step-by-step recurrence
(no chunking, no zoo code).

`cfg` is a mamba_ssm MambaConfig dict (ssm_cfg holds Mamba2's arguments) plus two epsilons that
Hugging Face configures and mamba_ssm fixes at 1e-5: "norm_eps" (block and final norms) and
"gated_norm_eps" (the mixer's gated RMSNorm).

    logits = reference_logits(state_dict, cfg, tokens)      # (B, T) -> (B, T, V), float64
    tokens = reference_greedy(state_dict, cfg, prompt, steps)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MIXER_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None, ngroups=1, D_has_hdim=False,
                      rmsnorm=True, norm_before_gate=False, dt_limit=(0.0, math.inf), bias=False, conv_bias=True)


def hf_to_reference_config(hf: dict) -> dict:
    """A Hugging Face Mamba2 config.json dict -> this module's cfg (mamba_ssm names)."""
    lo, hi = (float(v["__float__"]) if isinstance(v, dict) else float(v)  # transformers 5 writes {"__float__": "Infinity"}
              for v in hf.get("time_step_limit", (0.0, math.inf)))
    return dict(d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
                d_intermediate=0, rms_norm=True, tie_embeddings=hf.get("tie_word_embeddings", False),
                pad_vocab_size_multiple=1, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                gated_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                ssm_cfg=dict(layer="Mamba2", d_state=hf["state_size"], d_conv=hf.get("conv_kernel", 4),
                             expand=hf.get("expand", 2), headdim=hf["head_dim"], ngroups=hf["n_groups"],
                             bias=hf.get("use_bias", False), conv_bias=hf.get("use_conv_bias", True),
                             dt_limit=(lo, hi)))


def hf_to_ssm_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face parameter names -> mamba_ssm's (they differ only in the embedding's name)."""
    return {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in state_dict.items()}


def _norm(x: Tensor, sd: dict, prefix: str, rms: bool, eps: float) -> Tensor:
    if rms:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * sd[prefix + "weight"]
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps)


def _linear(x: Tensor, sd: dict, prefix: str) -> Tensor:
    out = x @ sd[prefix + "weight"].T
    return out + sd[prefix + "bias"] if prefix + "bias" in sd else out


def _mixer(u: Tensor, sd: dict, p: str, dim: int, s: dict, gated_eps: float) -> Tensor:
    """One Mamba2 layer, u (T, dim) -> (T, dim), one time step at a time."""
    T = u.shape[0]
    d_inner = s["expand"] * dim
    d_ssm = d_inner if s["d_ssm"] is None else s["d_ssm"]
    P, N, G = s["headdim"], s["d_state"], s["ngroups"]
    H = d_ssm // P
    d_mlp = d_inner - d_ssm
    z0, x0, z, xBC, dt = _linear(u, sd, p + "in_proj.").split([d_mlp, d_mlp, d_ssm, d_ssm + 2 * G * N, H], dim=-1)
    w = sd[p + "conv1d.weight"][:, 0]  # (C, K)
    K = w.shape[1]
    padded = torch.cat([xBC.new_zeros(K - 1, xBC.shape[1]), xBC])
    conv = torch.stack([(padded[t:t + K].T * w).sum(-1) for t in range(T)])
    if p + "conv1d.bias" in sd:
        conv = conv + sd[p + "conv1d.bias"]
    x, B, C = F.silu(conv).split([d_ssm, G * N, G * N], dim=-1)
    dt = F.softplus(dt + sd[p + "dt_bias"]).clamp(min=s["dt_limit"][0], max=s["dt_limit"][1])  # (T, H)
    A = -torch.exp(sd[p + "A_log"])
    D = sd[p + "D"].reshape(H, P) if s["D_has_hdim"] else sd[p + "D"][:, None]
    state = u.new_zeros(H, P, N)
    ys = []
    for t in range(T):
        xt = x[t].reshape(H, P)
        Bt = B[t].reshape(G, N).repeat_interleave(H // G, dim=0)  # (H, N): head h reads group h // (H / G)
        Ct = C[t].reshape(G, N).repeat_interleave(H // G, dim=0)
        state = torch.exp(dt[t] * A)[:, None, None] * state + dt[t][:, None, None] * xt[:, :, None] * Bt[:, None, :]
        ys.append(((state * Ct[:, None, :]).sum(-1) + D * xt).reshape(d_ssm))
    y = torch.stack(ys)
    if s["rmsnorm"]:
        gate = F.silu(z)
        v = y if s["norm_before_gate"] else y * gate
        groups = v.reshape(T, G, d_ssm // G)
        v = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + gated_eps)).reshape(T, d_ssm)
        v = v * sd[p + "norm.weight"]
        y = v * gate if s["norm_before_gate"] else v
    else:
        y = y * F.silu(z)
    if d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return _linear(y, sd, p + "out_proj.")


def reference_logits(state_dict: dict[str, Tensor], cfg: dict, tokens: Tensor) -> Tensor:
    """tokens (B, T) -> logits (B, T, V) in float64, one row at a time, from a mamba_ssm-named state dict."""
    sd = {k: v.double() for k, v in state_dict.items()}
    s = {**MIXER_DEFAULTS, **{k: v for k, v in cfg["ssm_cfg"].items() if k != "layer"}}
    s["dt_limit"] = tuple(float(v) for v in s["dt_limit"])
    rms, eps, gated_eps = cfg.get("rms_norm", True), cfg.get("norm_eps", 1e-5), cfg.get("gated_norm_eps", 1e-5)
    head = sd.get("lm_head.weight", sd["backbone.embedding.weight"])
    out = []
    for row in tokens:
        h = sd["backbone.embedding.weight"][row]
        for i in range(cfg["n_layer"]):
            p = f"backbone.layers.{i}."
            h = h + _mixer(_norm(h, sd, p + "norm.", rms, eps), sd, p + "mixer.", cfg["d_model"], s, gated_eps)
            if cfg.get("d_intermediate", 0):
                v, gate = _linear(_norm(h, sd, p + "norm2.", rms, eps), sd, p + "mlp.fc1.").chunk(2, dim=-1)
                h = h + _linear(v * F.silu(gate), sd, p + "mlp.fc2.")
        out.append(_norm(h, sd, "backbone.norm_f.", rms, eps) @ head.T)
    return torch.stack(out)


def reference_greedy(state_dict: dict[str, Tensor], cfg: dict, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation by recomputing the whole sequence each step (no cache at all)."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(reference_logits(state_dict, cfg, torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]
