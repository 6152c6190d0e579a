"""Sessa: causal attention whose output is fed back through an attention over its own past outputs.

    f = OutProj(Attention_RoPE(q_f, k_f, v_f))                      forward branch, H heads, GQA
    s_t = f_t + gamma_t * sum_{j<t} softmax_j(<q_b,t, k_b,j> / sqrt(D)) s_j     feedback branch
    gamma_t = gamma_max * tanh(gamma_bias + <gamma_ctx, x_t>)

i.e. s solves (I - gamma * alpha) s = f (op `feedback_solve`). See /work/shared/design/sessa.md and
docs/sessa.md. Parameter names match the reference checkpoints (blocks/reference_format.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from blocks.mixer import DecodeState, Mixer, check_backends, head_dims
from blocks.rope import RotaryEmbedding
from kernels.attention import attention
from kernels.feedback_solve import feedback_solve
from kernels.packing import segment_positions


@dataclass(kw_only=True)
class SessaState(DecodeState):
    """Sessa's decoding cache: 2·H_kv·d + 2·D numbers per token (k_b and s only with feedback)."""

    k_f: Tensor  # (B, max_len, H_kv, d) forward keys, RoPE applied
    v_f: Tensor  # (B, max_len, H_kv, d) forward values
    k_b: Tensor | None  # (B, max_len, D) feedback keys
    s: Tensor | None  # (B, max_len, D) past mixer outputs
    segmented: bool = False  # some row holds more than one segment id: the ops need seq_idx masks


class Sessa(Mixer):
    """The Sessa mixer (B, T, D) -> (B, T, D).

    Args:
        dim: width D.
        num_heads: forward-branch heads H (head dim d = D / H); out_proj is the identity when H == 1.
        num_kv_heads: key/value heads H_kv (grouped-query attention), default H.
        gamma_max: bound on the feedback gain |gamma_t|, in (0, 1).
        rope: rotary embedding (interleaved pairs) on the forward queries and keys.
        rope_base: RoPE base.
        feedback: False gives the ablation "Sessa without the feedback branch" (s = f).
        backends: op name -> backend pinned for this layer, e.g. {"feedback_solve": "reference"}.
    """

    def __init__(self, dim: int, num_heads: int = 1, num_kv_heads: int | None = None, gamma_max: float = 0.999,
                 rope: bool = True, rope_base: float = 10000.0, feedback: bool = True,
                 backends: dict[str, str] | None = None):
        super().__init__()
        num_kv_heads, head_dim = head_dims(dim, num_heads, num_kv_heads, rope)
        if not 0.0 < gamma_max < 1.0:
            raise ValueError(f"gamma_max must lie in (0, 1); got gamma_max={gamma_max}")
        self.ops = check_backends("Sessa", backends, uses=("attention", "feedback_solve") if feedback else ("attention",))
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.gamma_max, self.feedback = float(gamma_max), feedback
        kv_dim = num_kv_heads * head_dim
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, kv_dim)
        self.v_proj = nn.Linear(dim, kv_dim)
        self.out_proj = nn.Linear(dim, dim, bias=False) if num_heads > 1 else nn.Identity()
        self.rope = RotaryEmbedding(head_dim, rope_base) if rope else None
        if feedback:
            self.proj_fb = nn.Linear(dim, 2 * dim)  # -> q_b, k_b
            self.gamma_bias = nn.Parameter(torch.tensor(1.0))
            self.gamma_ctx = nn.Linear(dim, 1, bias=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"gamma_max={self.gamma_max}, rope={self.rope is not None}, feedback={self.feedback}")

    # ------------------------------------------------------------------ pieces
    def _forward_qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D), positions (B, T) or (T,) -> q (B, T, H, d), k, v (B, T, H_kv, d), RoPE applied."""
        q = rearrange(self.q_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def _feedback_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D) -> q_b, k_b (B, T, D) and the gain gamma (B, T)."""
        q_b, k_b = self.proj_fb(x).chunk(2, dim=-1)
        gamma = self.gamma_max * torch.tanh(self.gamma_bias + self.gamma_ctx(x)[..., 0])
        return q_b, k_b, gamma

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: SessaState | None = None) -> Tensor:
        """x (B, T, D) -> s (B, T, D). seq_idx (B, T) segment ids (packing / left padding);
        with a state, x holds the new tokens only and the state is advanced."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, {self.dim}); got {tuple(x.shape)}")
        if state is not None:
            return self._step(x, seq_idx, state)
        T = x.shape[1]
        positions = torch.arange(T, device=x.device) if seq_idx is None else segment_positions(seq_idx)
        q, k, v = self._forward_qkv(x, positions)
        f = attention(q, k, v, seq_idx=seq_idx, backend=self.ops["attention"])
        f = self.out_proj(rearrange(f, "b t h d -> b t (h d)"))
        if not self.feedback:
            return f
        q_b, k_b, gamma = self._feedback_inputs(x)
        return feedback_solve(f, q_b, k_b, gamma, seq_idx=seq_idx, backend=self.ops["feedback_solve"])

    def _step(self, x: Tensor, seq_idx: Tensor | None, state: SessaState) -> Tensor:
        """Prefill, chunked prefill or decoding: attend to the cache, then append to it."""
        if not isinstance(state, SessaState):
            raise TypeError(f"state must be a SessaState (from allocate_state); got {type(state).__name__}")
        B, T = x.shape[:2]
        P = state.length
        if seq_idx is None and not state.segmented:  # fast path: each row continues its one segment
            if B != state.batch_size or P + T > state.max_len:
                state.begin(x, None)  # raises the capacity / batch error
            positions = state.next_pos[:, None] + torch.arange(T, device=x.device)
            seq_new = state.seq_idx[:, P - 1:P].expand(B, T) if P else torch.zeros_like(positions)
        else:
            seq_new, positions = state.begin(x, seq_idx)
            row_ids = seq_new[:, :1] if P == 0 else state.seq_idx[:, :1]
            state.segmented = state.segmented or bool((seq_new != row_ids).any())
        S = P + T
        masks = None  # one segment per row: the ops need no segment ids
        if state.segmented:
            state.seq_idx[:, P:S] = seq_new
            masks = state.seq_idx[:, :S]

        q, k, v = self._forward_qkv(x, positions)
        state.k_f[:, P:S] = k
        state.v_f[:, P:S] = v
        keys, values = state.k_f[:, :S].to(q.dtype), state.v_f[:, :S].to(q.dtype)  # no-ops unless a cast
        f = attention(q, keys, values, seq_idx=masks, backend=self.ops["attention"])
        f = self.out_proj(rearrange(f, "b t h d -> b t (h d)"))
        if self.feedback:
            q_b, k_b, gamma = self._feedback_inputs(x)
            past_k, past_s = (state.k_b[:, :P].to(k_b.dtype), state.s[:, :P].to(f.dtype)) if P else (None, None)
            f = feedback_solve(f, q_b, k_b, gamma, past_k=past_k, past_s=past_s, seq_idx=masks,
                               backend=self.ops["feedback_solve"])
            state.k_b[:, P:S] = k_b
            state.s[:, P:S] = f
        state.commit(seq_new, positions)
        return f

    # ------------------------------------------------------------------ decoding state
    def allocate_state(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> SessaState:
        """An empty cache for `batch_size` rows of up to `max_len` tokens (dtype/device of q_proj by default)."""
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1; got batch_size={batch_size}, max_len={max_len}")
        device = self.q_proj.weight.device if device is None else device
        dtype = self.q_proj.weight.dtype if dtype is None else dtype
        kv = (batch_size, max_len, self.num_kv_heads, self.head_dim)
        fb = (batch_size, max_len, self.dim)
        new = lambda shape: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        return SessaState(**DecodeState.track(batch_size, max_len, device), k_f=new(kv), v_f=new(kv),
                          k_b=new(fb) if self.feedback else None, s=new(fb) if self.feedback else None)

    def state_numbers_per_token(self) -> int:
        """2·H_kv·d (forward keys and values) + 2·D (feedback keys and past outputs)."""
        return 2 * self.num_kv_heads * self.head_dim + (2 * self.dim if self.feedback else 0)
