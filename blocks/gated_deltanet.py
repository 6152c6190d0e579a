"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, arXiv 2412.06464) and DeltaNet (Yang et al. 2024,
arXiv 2406.06484), with the parameter names and layout of FLA's `GatedDeltaNet` layer:

    q, k, v = SiLU(causal depthwise conv(x W_q)), ... (x W_k), ... (x W_v)     # short convs, per head
    q, k = q / |q|, k / |k|                                                    # L2 norm per head
    beta = sigmoid(x W_b)                                                      # (B, T, H) in (0, 1)
    g = -exp(A_log) * softplus(x W_a + dt_bias)                                # Mamba-2-style log decay (gated only)
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T q_t / sqrt(dk)   # kernels.delta_rule
    y = W_o (RMSNorm(o) * SiLU(x W_g))                                         # per-head norm, output gate

DeltaNet is the same layer without the decay (no W_a, A_log, dt_bias: g = None). The decoding state
is the conv windows plus one (dk, dv) state per head: constant in the sequence length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from blocks.mixer import check_backends, check_positive_ints
from blocks.norms import GatedRMSNorm
from blocks.recurrent import RecurrentMixer, RecurrentState
from kernels.delta_rule import delta_rule


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in float32 for half precision (FLA's l2norm)."""
    work = torch.promote_types(x.dtype, torch.float32)
    return (x.to(work) * torch.rsqrt(x.to(work).pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class GatedDeltaNet(RecurrentMixer):
    """Gated DeltaNet layer: (B, T, dim) -> (B, T, dim).

    num_heads: H;  head_dim: dk, the key width per head (default round(0.75 * dim / num_heads));  expand_v: value
    width per head dv = expand_v * head_dim;  use_short_conv / conv_size / conv_bias: the q, k, v
    convs;  norm_eps: of the output norm;  chunk_size: hint for the chunked delta_rule backend (32: its
    fastest on CPU at the default widths; FLA's kernels keep their own 64);
    backends: {"delta_rule": backend} pinned for this layer. A_log is initialised so that
    exp(A_log) is uniform in (0, 16), dt_bias so that softplus(dt_bias) is log-uniform in [1e-3, 0.1].
    The default widths are the paper's and FLA's allocation of about 6 dim^2 parameters, as in Mamba-2:
    q_proj and k_proj 0.75 dim^2 each, v_proj, g_proj and o_proj 1.5 dim^2 each.
    """

    decay = True  # DeltaNet: False

    def __init__(self, dim: int, num_heads: int = 4, head_dim: int | None = None, expand_v: float = 2.0,
                 use_short_conv: bool = True, conv_size: int = 4, conv_bias: bool = False, norm_eps: float = 1e-5,
                 chunk_size: int = 32, backends: dict[str, str] | None = None):
        super().__init__()
        name = type(self).__name__
        check_positive_ints(name, dim=dim, num_heads=num_heads, conv_size=conv_size, chunk_size=chunk_size)
        head_dim = round(0.75 * dim / num_heads) if head_dim is None else head_dim
        check_positive_ints(name, head_dim=head_dim)
        if expand_v <= 0 or expand_v * head_dim != int(expand_v * head_dim):
            raise ValueError(f"{name}: expand_v * head_dim must be a positive integer; got expand_v={expand_v}, "
                             f"head_dim={head_dim}")
        self.ops = check_backends(name, backends, uses=("delta_rule",))
        self.dim, self.num_heads, self.head_k_dim, self.head_v_dim = dim, num_heads, head_dim, int(expand_v * head_dim)
        self.chunk_size = chunk_size
        key_dim, value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim

        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.b_proj = nn.Linear(dim, num_heads, bias=False)
        if self.decay:
            self.a_proj = nn.Linear(dim, num_heads, bias=False)
            self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(0, 16)))
            dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self._init_convs(use_short_conv, conv_size, conv_bias, key_dim, value_dim)
        self.g_proj = nn.Linear(dim, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, norm_before_gate=True)
        self.o_proj = nn.Linear(value_dim, dim, bias=False)

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: RecurrentState | None = None) -> Tensor:
        """x (B, T, dim) -> (B, T, dim). seq_idx (B, T) segment ids; with a state, of the new tokens only."""
        step = self._begin(x, seq_idx, state)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = self._short_convs(step, q, k, v) if self.use_short_conv else (F.silu(q), F.silu(k), F.silu(v))
        q = l2_normalize(rearrange(q, "b t (h d) -> b t h d", d=self.head_k_dim))
        k = l2_normalize(rearrange(k, "b t (h d) -> b t h d", d=self.head_k_dim))
        v = rearrange(v, "b t (h d) -> b t h d", d=self.head_v_dim)
        work = torch.promote_types(x.dtype, torch.float32)
        beta = torch.sigmoid(self.b_proj(x).to(work))  # (B, T, H)
        g = None
        if self.decay:
            g = -torch.exp(self.A_log.to(work)) * F.softplus(self.a_proj(x).to(work) + self.dt_bias.to(work))
        o = self._recur(step, delta_rule, q, k, v, beta, g)
        o = self.o_norm(o, rearrange(self.g_proj(x), "b t (h d) -> b t h d", d=self.head_v_dim))
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))


class DeltaNet(GatedDeltaNet):
    """DeltaNet layer: Gated DeltaNet without the decay (g = None); same arguments and names otherwise."""

    decay = False
