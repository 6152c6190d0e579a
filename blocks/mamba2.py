"""Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs"), the standard layer of mamba_ssm:

    z, xBC, dt = split(in_proj(u))                    # d_inner, d_inner + 2 G N, H
    x, B, C = split(SiLU(causal depthwise conv(xBC)))  # blocks.short_conv, as the recurrent mixers' convs
    dt = softplus(dt + dt_bias);  A = -exp(A_log)      # per head (dt clamped to dt_limit if set)
    y = ssd(x, dt, A, B, C) + D x                      # kernels.ssd, the layer's pinned backend
    out = out_proj(GatedRMSNorm(y, z))                 # RMSNorm(y * silu(z)) per group

Options of mamba_ssm's layer that checkpoints use (all off at the defaults): `dt_limit`,
`norm_before_gate`, `gated_norm=False` (y * silu(z), no norm), `conv_bias`, `bias` (in/out
projections), `D_per_channel` (D per channel instead of per head), `ssm_dim` < d_inner (the other
d_inner - ssm_dim channels form a gated MLP: silu(z0) * x0, placed before y), `norm_eps`.

Packed sequences / left padding (seq_idx): the conv never reads across a segment change and the
ssd op resets its state at a change. Decoding keeps a constant-size `Mamba2State`: the last
conv_kernel - 1 conv inputs (with their segment ids) and the SSM state (B, H, P, N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from blocks.mixer import DecodeState, Mixer, check_backends
from blocks.norms import GatedRMSNorm
from blocks.short_conv import ShortConvolution
from kernels.ssd import ssd


@dataclass(kw_only=True)
class Mamba2State(DecodeState):
    """Decoding state of one Mamba2 layer (constant size in the sequence length)."""

    conv: Tensor  # (B, conv_kernel - 1, conv_dim) the last conv inputs, oldest first
    conv_seq: Tensor  # (B, conv_kernel - 1) int64 their segment ids
    ssm: Tensor  # (B, heads, head_dim, state_dim)


class Mamba2(Mixer):
    """Mamba-2 layer: (B, T, dim) -> (B, T, dim).

    d_inner = expand * dim channels in heads of `head_dim` (heads = d_inner / head_dim); B and C have
    `num_groups` groups of `state_dim` (heads share them in blocks of heads / num_groups).
    `conv_kernel`: width of the causal depthwise conv over [x, B, C]. `chunk_size`: hint for the
    chunked ssd backends. dt_bias is initialised so softplus(dt_bias) is log-uniform in
    [dt_min, dt_max]; A_log so that -A is uniform in [1, 16]; D = 1.
    `backends`: op name -> backend pinned for this layer (this layer calls `ssd`).

    Upstream options (mamba_ssm's names in brackets), all off at the defaults:
        dt_limit (lo, hi) [dt_limit]: clamp softplus(dt + dt_bias) to [lo, hi] (hi None or inf: no
            upper bound), in the forward pass and when decoding alike; None: no clamp.
        gated_norm [rmsnorm]: False drops the gated norm: y * silu(z) goes straight to out_proj.
        norm_before_gate [norm_before_gate]: RMSNorm(y) * silu(z) instead of RMSNorm(y * silu(z)).
        norm_eps: epsilon of the gated norm.
        conv_bias [conv_bias]: the conv has a bias.  bias [bias]: in_proj and out_proj have biases.
        D_per_channel [D_has_hdim]: D holds one value per channel (heads * head_dim), not per head.
        ssm_dim [d_ssm]: channels that go through the SSM (heads = ssm_dim / head_dim); the other
            d_inner - ssm_dim channels are a gated MLP silu(z0) * x0 concatenated before y.
    """

    def __init__(self, dim: int, state_dim: int = 64, expand: int = 2, head_dim: int = 64, num_groups: int = 1,
                 conv_kernel: int = 4, chunk_size: int = 64, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_limit: tuple[float, float | None] | None = None, gated_norm: bool = True,
                 norm_before_gate: bool = False, norm_eps: float = 1e-5, conv_bias: bool = True, bias: bool = False,
                 D_per_channel: bool = False, ssm_dim: int | None = None, backends: dict[str, str] | None = None):
        super().__init__()
        for name, value in dict(dim=dim, state_dim=state_dim, head_dim=head_dim, num_groups=num_groups,
                                conv_kernel=conv_kernel, chunk_size=chunk_size).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba2: {name} must be a positive int; got {name}={value!r}")
        if expand <= 0 or expand * dim != int(expand * dim):
            raise ValueError(f"Mamba2: expand * dim must be a positive integer; got expand={expand}, dim={dim}")
        d_inner = int(expand * dim)
        d_ssm = d_inner if ssm_dim is None else ssm_dim
        if isinstance(d_ssm, bool) or not isinstance(d_ssm, int) or not 1 <= d_ssm <= d_inner:
            raise ValueError(f"Mamba2: ssm_dim must be an int in [1, expand * dim = {d_inner}] or None; "
                             f"got ssm_dim={ssm_dim!r}")
        if d_ssm % head_dim:
            what = "expand * dim" if ssm_dim is None else "ssm_dim"
            raise ValueError(f"Mamba2: {what} = {d_ssm} must be divisible by head_dim={head_dim}")
        heads = d_ssm // head_dim
        if heads % num_groups:
            raise ValueError(f"Mamba2: the {heads} heads ({'expand * dim' if ssm_dim is None else 'ssm_dim'} / "
                             f"head_dim) must be divisible by num_groups={num_groups}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2: need 0 < dt_min <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
        if dt_limit is not None:
            if len(dt_limit) != 2 or dt_limit[0] is None:
                raise ValueError(f"Mamba2: dt_limit must be None or (lo, hi); got dt_limit={dt_limit!r}")
            lo, hi = float(dt_limit[0]), None if dt_limit[1] is None or dt_limit[1] == math.inf else float(dt_limit[1])
            if not 0 <= lo <= (math.inf if hi is None else hi):
                raise ValueError(f"Mamba2: dt_limit (lo, hi) needs 0 <= lo <= hi; got dt_limit={dt_limit!r}")
            dt_limit = None if (lo, hi) == (0.0, None) else (lo, hi)  # softplus > 0 already
        if not norm_eps > 0:
            raise ValueError(f"Mamba2: norm_eps must be > 0; got norm_eps={norm_eps!r}")
        if norm_before_gate and not gated_norm:
            raise ValueError("Mamba2: norm_before_gate=True needs the gated norm (gated_norm=True)")
        self.ops = check_backends("Mamba2", backends, uses=("ssd",))

        self.dim, self.d_inner, self.num_heads, self.head_dim = dim, d_inner, heads, head_dim
        self.state_dim, self.num_groups, self.conv_kernel, self.chunk_size = state_dim, num_groups, conv_kernel, chunk_size
        self.d_ssm, self.d_mlp = d_ssm, d_inner - d_ssm
        self.conv_dim = d_ssm + 2 * num_groups * state_dim
        self.dt_limit, self.D_per_channel = dt_limit, D_per_channel

        # -> z0, x0 (the gated MLP's d_mlp channels each), z, xBC, dt
        self.in_proj = nn.Linear(dim, 2 * self.d_mlp + d_ssm + self.conv_dim + heads, bias=bias)
        self.conv1d = ShortConvolution(self.conv_dim, conv_kernel, bias=conv_bias)  # SiLU(causal depthwise conv)
        dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(d_ssm if D_per_channel else heads))
        self.norm = GatedRMSNorm(d_ssm, eps=norm_eps, group_size=d_ssm // num_groups,
                                 norm_before_gate=norm_before_gate) if gated_norm else None
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)

    def allocate_state(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> Mamba2State:
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        K = self.conv_kernel
        return Mamba2State(**Mamba2State.track(batch_size, max_len, device),
                           conv=torch.zeros(batch_size, K - 1, self.conv_dim, device=device, dtype=dtype),
                           conv_seq=torch.zeros(batch_size, K - 1, dtype=torch.long, device=device),
                           ssm=torch.zeros(batch_size, self.num_heads, self.head_dim, self.state_dim,
                                           device=device, dtype=dtype))

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: Mamba2State | None = None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim). seq_idx (B, T): segment ids (of the new tokens with a state)."""
        Bt, T, _ = x.shape
        window = window_seq = None  # the conv inputs before x: none (zeros) without a state
        if state is not None:
            seq_idx, positions = state.begin(x, seq_idx)
            window, window_seq = state.conv, state.conv_seq
        elif seq_idx is not None and tuple(seq_idx.shape) != (Bt, T):
            raise ValueError(f"seq_idx must be (B, T) = {(Bt, T)}; got {tuple(seq_idx.shape)}")

        z0, x0, z, xBC, dt = self.in_proj(x).split(
            [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.num_heads], dim=-1)
        xs, B, C = self.conv1d(xBC, seq_idx, window, window_seq).split(
            [self.d_ssm, self.num_groups * self.state_dim, self.num_groups * self.state_dim], dim=-1)
        xs = rearrange(xs, "b t (h p) -> b t h p", p=self.head_dim)
        B = rearrange(B, "b t (g n) -> b t g n", g=self.num_groups)
        C = rearrange(C, "b t (g n) -> b t g n", g=self.num_groups)
        work = torch.promote_types(x.dtype, torch.float32)
        dt = F.softplus(dt.to(work) + self.dt_bias.to(work))  # (B, T, H)
        if self.dt_limit is not None:
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        A = -torch.exp(self.A_log.to(work))  # (H,)

        if state is None:
            y = ssd(xs, dt, A, B, C, seq_idx=seq_idx, chunk_size=self.chunk_size, backend=self.ops["ssd"])
        else:
            # a row whose first new token starts a new segment starts from a zero state
            if state.length:
                cont = seq_idx[:, 0] == state.seq_idx[:, state.length - 1]
            else:
                cont = torch.ones(Bt, dtype=torch.bool, device=x.device)
            initial = torch.where(cont[:, None, None, None], state.ssm, 0.0)  # (not a product: 0 * NaN is NaN)
            y, final = ssd(xs, dt, A, B, C, initial_state=initial, seq_idx=seq_idx, chunk_size=self.chunk_size,
                           return_final_state=True, backend=self.ops["ssd"])
            state.ssm = final.to(state.ssm.dtype)
            state.conv = torch.cat([window.to(xBC.dtype), xBC], dim=1)[:, T:].to(state.conv.dtype)
            state.conv_seq = torch.cat([window_seq, seq_idx], dim=1)[:, T:]
            state.commit(seq_idx, positions)

        D = rearrange(self.D, "(h p) -> h p", p=self.head_dim) if self.D_per_channel else self.D[:, None]
        y = rearrange(y + xs * D.to(xs.dtype), "b t h p -> b t (h p)")
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        if self.d_mlp:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)
