"""Sessa: causal attention whose output is fed back through an attention over its own past outputs.

    f = OutProj(Attention_RoPE(q_f, k_f, v_f))                      forward branch, H heads, GQA
    s_t = f_t + gamma_t * sum_{j<t} softmax_j(<q_b,t, k_b,j> / sqrt(D)) s_j     feedback branch
    gamma_t = gamma_max * tanh(gamma_bias + <gamma_ctx, x_t>)

i.e. s solves (I - gamma * alpha) s = f (op `feedback_solve`); docs/sessa.md states the math. The
forward branch is the Attention mixer (this class subclasses it: q/k/v projections with biases,
out_proj only when H > 1, RoPE, GQA and its KV cache). Parameter names match the reference
checkpoints (blocks/reference_format.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blocks.attention import Attention, AttentionState
from blocks.mixer import check_backends
from kernels import nan_policy
from kernels.feedback_solve import feedback_solve


@dataclass(kw_only=True)
class SessaState(AttentionState):
    """Sessa's decoding cache: 2·H_kv·d + 2·D numbers per token (k_b and s only with feedback).

    k, v: (B, max_len, H_kv, d) forward keys (RoPE applied) and values, as in AttentionState.
    """

    k_b: Tensor | None = None  # (B, max_len, D) feedback keys
    s: Tensor | None = None  # (B, max_len, D) past mixer outputs
    nonfinite_fb: Tensor | None = None  # (B, max_len) bool: steps whose k_b or s was NaN or inf (stored as zeros)


class Sessa(Attention):
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
        if not 0.0 < gamma_max < 1.0:
            raise ValueError(f"gamma_max must lie in (0, 1); got gamma_max={gamma_max}")
        ops = check_backends("Sessa", backends, uses=("attention", "feedback_solve") if feedback else ("attention",))
        super().__init__(dim, num_heads, num_kv_heads, rope=rope, rope_base=rope_base,
                         backends={"attention": ops["attention"]}, qkv_bias=True, out_proj=num_heads > 1)
        self.ops = ops
        self.gamma_max, self.feedback = float(gamma_max), feedback
        if feedback:
            self.proj_fb = nn.Linear(dim, 2 * dim)  # -> q_b, k_b
            self.gamma_bias = nn.Parameter(torch.tensor(1.0))
            self.gamma_ctx = nn.Linear(dim, 1, bias=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"gamma_max={self.gamma_max}, rope={self.rope is not None}, feedback={self.feedback}")

    def _feedback_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D) -> q_b, k_b (B, T, D) and the gain gamma (B, T)."""
        q_b, k_b = self.proj_fb(x).chunk(2, dim=-1)
        gamma = self.gamma_max * torch.tanh(self.gamma_bias + self.gamma_ctx(x)[..., 0])
        return q_b, k_b, gamma

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: SessaState | None = None) -> Tensor:
        """x (B, T, D) -> s (B, T, D). seq_idx (B, T) segment ids (packing / left padding);
        with a state, x holds the new tokens only and the state is advanced."""
        if state is not None and not isinstance(state, SessaState):
            raise TypeError(f"state must be a SessaState (from allocate_state); got {type(state).__name__}")
        past = 0 if state is None else state.length
        f = super().forward(x, seq_idx=seq_idx, state=state)  # the forward branch; caches k, v
        if not self.feedback:
            return f
        q_b, k_b, gamma = self._feedback_inputs(x)
        if state is None:
            return feedback_solve(f, q_b, k_b, gamma, seq_idx=seq_idx, backend=self.ops["feedback_solve"])
        # against the cached feedback keys and outputs of steps [0, past); the new ones follow them
        new = slice(past, state.length)
        masks = state.past_seq_idx if state.segmented else None  # (B, past + T), only when a row holds several segments
        past_k, past_s = (state.k_b[:, :past].to(k_b.dtype), state.s[:, :past].to(f.dtype)) if past else (None, None)
        s = feedback_solve(f, q_b, k_b, gamma, past_k=past_k, past_s=past_s, seq_idx=masks,
                           nonfinite_past=state.nonfinite_fb[:, :past] if past else None,
                           backend=self.ops["feedback_solve"])
        (k_b, stored), bad = nan_policy.cache_entries(k_b, s)  # the cache holds finite values and their flags
        state.k_b[:, new], state.s[:, new] = k_b, stored
        state.nonfinite_fb[:, new] = False if bad is None else bad
        return s

    def allocate_state(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> SessaState:
        """An empty cache for `batch_size` rows of up to `max_len` tokens (dtype/device of q_proj by default)."""
        fields = self._state_fields(batch_size, max_len, device, dtype)
        if self.feedback:  # feedback keys and past outputs (B, max_len, D), with k's device and dtype
            fields.update(k_b=fields["k"].new_zeros(batch_size, max_len, self.dim),
                          s=fields["k"].new_zeros(batch_size, max_len, self.dim),
                          nonfinite_fb=torch.zeros(batch_size, max_len, dtype=torch.bool, device=fields["k"].device))
        return SessaState(**fields)

    def state_numbers_per_token(self) -> int:
        """2·H_kv·d (forward keys and values) + 2·D (feedback keys and past outputs)."""
        return super().state_numbers_per_token() + (2 * self.dim if self.feedback else 0)
