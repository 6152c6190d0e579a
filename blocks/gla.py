"""Gated linear attention (Yang et al. 2023, arXiv 2312.06635), with the parameter names and layout of
FLA's `GatedLinearAttention` layer:

    q, k, v = x W_q, x W_k, x W_v                         (optionally SiLU(short causal conv(.)) each)
    g = logsigmoid(x W_gk1 W_gk2 + b) / gate_logit_normalizer      # low-rank key-channel gate, (B, T, H, dk)
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t / sqrt(dk)     # kernels.linear_attention
    y = W_o (RMSNorm(o) * SiLU(x W_g))                    # per-head norm, output gate

The paper's forget gate alpha_t = sigmoid(x W_a1 W_a2 + b)^(1/tau) is g = log alpha_t with tau the
normaliser (16). The decoding state is one (dk, dv) state per head (plus the conv windows when
`use_short_conv`): constant in the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from blocks.mixer import check_backends, check_positive_ints
from blocks.norms import GatedRMSNorm
from blocks.recurrent import RecurrentMixer, RecurrentState
from kernels.linear_attention import linear_attention


class GatedLinearAttention(RecurrentMixer):
    """GLA layer: (B, T, dim) -> (B, T, dim).

    num_heads: H;  expand_k / expand_v: key and value widths expand_k * dim and expand_v * dim, split
    into H heads (dk, dv);  gate_low_rank_dim: rank of the gate projection;  gate_logit_normalizer: tau;
    use_short_conv / conv_size / conv_bias: optional q, k, v convs (off, as in FLA);  norm_eps: of the
    output norm;  chunk_size: hint for the chunked backend (with key-channel decays it caps chunks at
    16 steps);  backends: {"linear_attention": backend} pinned for this layer.
    """

    def __init__(self, dim: int, num_heads: int = 4, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, use_short_conv: bool = False,
                 conv_size: int = 4, conv_bias: bool = False, norm_eps: float = 1e-5, chunk_size: int = 64,
                 backends: dict[str, str] | None = None):
        super().__init__()
        check_positive_ints("GatedLinearAttention", dim=dim, num_heads=num_heads, gate_low_rank_dim=gate_low_rank_dim,
                            conv_size=conv_size, chunk_size=chunk_size)
        key_dim, value_dim = expand_k * dim, expand_v * dim
        for arg, width, expand in (("expand_k", key_dim, expand_k), ("expand_v", value_dim, expand_v)):
            if width <= 0 or width != int(width) or int(width) % num_heads:
                raise ValueError(f"GatedLinearAttention: {arg} * dim = {width} must be a positive integer divisible by "
                                 f"num_heads={num_heads}; got {arg}={expand}, dim={dim}")
        if gate_logit_normalizer <= 0:
            raise ValueError(f"GatedLinearAttention: gate_logit_normalizer must be > 0; got {gate_logit_normalizer}")
        key_dim, value_dim = int(key_dim), int(value_dim)
        self.ops = check_backends("GatedLinearAttention", backends, uses=("linear_attention",))
        self.dim, self.num_heads = dim, num_heads
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.gate_logit_normalizer, self.chunk_size = gate_logit_normalizer, chunk_size

        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.g_proj = nn.Linear(dim, value_dim, bias=False)
        self._init_convs(use_short_conv, conv_size, conv_bias, key_dim, value_dim)
        self.gk_proj = nn.Sequential(nn.Linear(dim, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, key_dim, bias=True))
        self.o_proj = nn.Linear(value_dim, dim, bias=False)
        self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim, eps=norm_eps, norm_before_gate=True)

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: RecurrentState | None = None) -> Tensor:
        """x (B, T, dim) -> (B, T, dim). seq_idx (B, T) segment ids; with a state, of the new tokens only."""
        step = self._begin(x, seq_idx, state)
        q, k, v = self._short_convs(step, self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q, k = (rearrange(t, "b t (h d) -> b t h d", d=self.head_k_dim) for t in (q, k))
        v = rearrange(v, "b t (h d) -> b t h d", d=self.head_v_dim)
        work = torch.promote_types(x.dtype, torch.float32)
        gk = F.logsigmoid(self.gk_proj(x).to(work)) / self.gate_logit_normalizer
        o = self._recur(step, linear_attention, q, k, v, rearrange(gk, "b t (h d) -> b t h d", d=self.head_k_dim))
        o = self.g_norm_swish_gate(o, rearrange(self.g_proj(x), "b t (h d) -> b t h d", d=self.head_v_dim))
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))
