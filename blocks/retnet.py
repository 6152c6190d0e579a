"""Multi-scale retention, RetNet's token mixer (Sun et al. 2023, arXiv 2307.08621), with the parameter
names and layout of FLA's `MultiScaleRetention` layer:

    q, k = RoPE(x W_q), RoPE(x W_k);  v = x W_v           (optionally SiLU(short causal conv(.)) before)
    S_t = gamma_h S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t / sqrt(dk),  gamma_h = 1 - 2^(-5-h)   # kernels.linear_attention
    y = W_o (GroupNorm_h(o) * SiLU(x W_g))                # group norm per head (RMS, as FLA and torchscale), swish gate

The paper's rotation of q and k (xPos without its extrapolation scaling) is RoPE on interleaved pairs;
positions restart at 0 in every segment and continue from the decoding state. Each head decays at
its own fixed rate gamma_h (h = 0 .. H - 1), so heads see from about 32 to 2^(4+H) tokens back.
The decoding state is one (dk, dv) state per head: constant in the sequence length.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from blocks.mixer import check_backends, check_positive_ints
from blocks.norms import GatedRMSNorm
from blocks.recurrent import RecurrentMixer, RecurrentState
from blocks.rope import RotaryEmbedding
from kernels.linear_attention import linear_attention


class MultiScaleRetention(RecurrentMixer):
    """Multi-scale retention: (B, T, dim) -> (B, T, dim).

    num_heads: H;  expand_k / expand_v: key and value widths expand_k * dim and expand_v * dim, split
    into H heads (dk even, for RoPE);  rope_base: RoPE base;  use_short_conv / conv_size / conv_bias:
    optional q, k, v convs (off, as in FLA);  norm_eps: of the group norm;  chunk_size: hint for the
    chunked backend;  backends: {"linear_attention": backend} pinned for this layer.
    """

    def __init__(self, dim: int, num_heads: int = 8, expand_k: float = 1.0, expand_v: float = 2.0,
                 rope_base: float = 10000.0, use_short_conv: bool = False, conv_size: int = 4, conv_bias: bool = False,
                 norm_eps: float = 1e-5, chunk_size: int = 64, backends: dict[str, str] | None = None):
        super().__init__()
        check_positive_ints("MultiScaleRetention", dim=dim, num_heads=num_heads, conv_size=conv_size,
                            chunk_size=chunk_size)
        key_dim, value_dim = expand_k * dim, expand_v * dim
        for arg, width, expand in (("expand_k", key_dim, expand_k), ("expand_v", value_dim, expand_v)):
            if width <= 0 or width != int(width) or int(width) % num_heads:
                raise ValueError(f"MultiScaleRetention: {arg} * dim = {width} must be a positive integer divisible by "
                                 f"num_heads={num_heads}; got {arg}={expand}, dim={dim}")
        key_dim, value_dim = int(key_dim), int(value_dim)
        if (key_dim // num_heads) % 2:
            raise ValueError(f"MultiScaleRetention: RoPE needs an even key width per head; expand_k * dim / num_heads = "
                             f"{key_dim} / {num_heads} = {key_dim // num_heads}")
        self.ops = check_backends("MultiScaleRetention", backends, uses=("linear_attention",))
        self.dim, self.num_heads = dim, num_heads
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.chunk_size = chunk_size

        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.g_proj = nn.Linear(dim, value_dim, bias=False)
        self._init_convs(use_short_conv, conv_size, conv_bias, key_dim, value_dim)
        self.o_proj = nn.Linear(value_dim, dim, bias=False)
        self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim, eps=norm_eps, norm_before_gate=True)
        self.rotary = RotaryEmbedding(self.head_k_dim, rope_base)
        # log gamma_h, fixed (a buffer, not a parameter; not saved: it follows from num_heads)
        self.register_buffer("log_decay", torch.log(1 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64))),
                             persistent=False)

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: RecurrentState | None = None) -> Tensor:
        """x (B, T, dim) -> (B, T, dim). seq_idx (B, T) segment ids; with a state, of the new tokens only."""
        step = self._begin(x, seq_idx, state)
        q, k, v = self._short_convs(step, self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q, k = (self.rotary(rearrange(t, "b t (h d) -> b t h d", d=self.head_k_dim), step.positions) for t in (q, k))
        v = rearrange(v, "b t (h d) -> b t h d", d=self.head_v_dim)
        work = torch.promote_types(x.dtype, torch.float32)
        g = self.log_decay.to(work).expand(*x.shape[:2], self.num_heads)  # (B, T, H)
        o = self._recur(step, linear_attention, q, k, v, g)
        o = self.g_norm_swish_gate(o, rearrange(self.g_proj(x), "b t (h d) -> b t h d", d=self.head_v_dim))
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))
