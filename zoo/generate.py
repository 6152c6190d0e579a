"""Sampling from a causal language model with one decoding cache for its whole stack.

    out = generate(model, [[72, 105], [84, 104, 101]], max_new_tokens=50, top_p=0.9, seed=0)
    out = generate(model, prompts, max_new_tokens=50, greedy=True, stop_tokens=[10])
    out, scores = generate(model, prompts, max_new_tokens=20, return_scores=True)
    generate(model, prompts, max_new_tokens=50, stream=lambda row, token: print(row, token))

Prompts of different lengths are left-padded into one batch; the pads get segment id -1 and the
prompt tokens 0 (kernels.packing), so every mixer keeps each prompt apart from its pads and every
row is computed exactly as if it ran alone. The prompts are prefilled in one parallel pass (or in
chunks of `prefill_chunk` tokens), then each row advances one token per step until it samples a
stop token or reaches `max_new_tokens`.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from zoo.cache import StackCache


def _check_model(model: nn.Module) -> int:
    """generate() needs a causal LM: model(tokens, seq_idx=, cache=) -> logits (B, T, V). -> its vocab_size."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a causal language model (an nn.Module such as zoo.models.CausalLM); "
                        f"got {type(model).__name__}")
    name = type(model).__name__
    if getattr(model, "num_classes", None) is not None:
        raise TypeError(f"model must be a causal language model; got {name}, a classifier (num_classes="
                        f"{model.num_classes}) that predicts one label per sequence, not the next token")
    vocab = getattr(model, "vocab_size", None)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise TypeError(f"model must be a causal language model with an int vocab_size (e.g. zoo.models.CausalLM); "
                        f"{name} has vocab_size={vocab!r}")
    if "cache" not in inspect.signature(model.forward).parameters:
        raise TypeError(f"model must be a causal language model whose forward takes cache= (a decoding cache); "
                        f"{name}.forward does not")
    return vocab


def _check_finite(logits: Tensor, finished: list[bool], step: int) -> None:
    """Refuse to sample from NaN or inf logits (a NaN weight or input; greedy would silently pick a
    NaN's index, sampling would fail inside torch.multinomial) of a row still generating."""
    bad = [b for b, row_bad in enumerate((~torch.isfinite(logits)).any(dim=-1).tolist()) if row_bad and not finished[b]]
    if bad:
        raise ValueError(f"generate: the model's logits are not finite (NaN or inf) for row {bad[0]} at new token "
                         f"{step}: check the model's weights and the prompt (every op passes NaN on, see kernels.nan_policy)")


def _check_stop_tokens(stop_tokens, vocab_size: int) -> set[int]:
    """An int or a sequence of ints in [0, vocab_size) -> a set; errors name stop_tokens."""
    if isinstance(stop_tokens, Tensor):
        stop_tokens = stop_tokens.reshape(-1).tolist()
    if isinstance(stop_tokens, int) and not isinstance(stop_tokens, bool):
        stop_tokens = [stop_tokens]
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, (Sequence, set, frozenset)):
        raise TypeError(f"stop_tokens must be token ids: an int or a list of ints, e.g. stop_tokens=[10]; "
                        f"got {stop_tokens!r}")
    bad = [t for t in stop_tokens if isinstance(t, bool) or not isinstance(t, int)]
    if bad:
        raise TypeError(f"stop_tokens must be token ids (ints); got {bad[:5]} in stop_tokens={list(stop_tokens)!r}")
    outside = [t for t in stop_tokens if not 0 <= t < vocab_size]
    if outside:
        raise ValueError(f"stop_tokens must lie in [0, vocab_size={vocab_size}); got {outside[:5]}: the model "
                         "can never produce them")
    return set(stop_tokens)


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token lists, e.g. [[1, 2, 3], [4, 5]]")
    checked = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, int) or not isinstance(prompt, Sequence) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"prompts must be a list of token lists (lists of ints), e.g. [[1, 2, 3]]; "
                             f"prompts[{i}] is {prompt!r}")
        if not prompt:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}] has tokens outside [0, vocab_size={vocab_size}): {bad[:5]}")
        checked.append(list(prompt))
    return checked


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor | None]:
    """Token lists -> tokens (B, L) left-padded with pad_id, and seq_idx (B, L) with -1 on the pads
    and 0 on the prompt tokens (None when no row needs padding)."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    L = int(lengths.max())
    tokens = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        tokens[b, L - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
    if bool((lengths == L).all()):
        return tokens, None
    seq_idx = torch.where(torch.arange(L, device=device)[None] >= L - lengths[:, None], 0, -1)
    return tokens, seq_idx.long()


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """logits (B, V) -> logits / temperature with -inf outside the sampling support: the top_k
    largest (ties at the k-th value kept), then the smallest set of most likely tokens whose
    probability reaches top_p (nucleus; the most likely token is always kept)."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, greedy: bool,
                   prefill_chunk: int | None, pad_id: int, vocab_size: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got max_new_tokens={max_new_tokens!r}")
    if not greedy and (not _is_number(temperature) or not 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be > 0 and finite (use greedy=True for argmax decoding); "
                         f"got temperature={temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None; got top_k={top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] or be None; got top_p={top_p!r}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive int or None; got prefill_chunk={prefill_chunk!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id must lie in [0, vocab_size={vocab_size}) (an int); got pad_id={pad_id!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@torch.inference_mode()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             stop_tokens: Sequence[int] = (), seed: int | None = None, pad_id: int = 0,
             prefill_chunk: int | None = None, stream: Callable[[int, int], None] | None = None,
             return_scores: bool = False) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Continue each prompt; returns the new tokens of each row (a stop token, when sampled, is kept
    as the row's last token).

    Args:
        model: a causal LM: `model(tokens (B, T), seq_idx=, cache=) -> logits (B, T, V)` with a
            `vocab_size` (zoo.models.CausalLM with any stack).
        prompts: B token lists, of different lengths if wanted, each non-empty.
        max_new_tokens: at most this many new tokens per row.
        temperature: logits are divided by it before sampling (> 0).
        top_k: sample only among the k most likely tokens.
        top_p: sample only from the smallest set of most likely tokens with total probability >= top_p.
        greedy: take the argmax (temperature, top_k and top_p are then unused).
        stop_tokens: token ids (an int or a list of ints in [0, vocab_size)); a row finishes when
            it produces one of these.
        seed: seeds the torch.Generator used for sampling; None draws the seed from torch's global
            generator (so torch.manual_seed makes a run reproducible too).
        pad_id: token placed on the left of shorter prompts (its value does not change the result).
        prefill_chunk: prefill the prompts in chunks of this many tokens (None: one pass).
        stream: called as stream(row, token) for every new token, in order, as it is produced.
        return_scores: also return, per row, the model's log-probability (temperature 1, before
            top-k/top-p) of each generated token.
    """
    vocab_size = _check_model(model)
    rows = _check_prompts(prompts, vocab_size)
    _check_options(max_new_tokens, temperature, top_k, top_p, greedy, prefill_chunk, pad_id, vocab_size)
    stop = _check_stop_tokens(stop_tokens, vocab_size)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)

    tokens, seq_idx = left_pad(rows, pad_id, device)
    B, L = tokens.shape
    cache = StackCache.allocate(model, B, L + max_new_tokens - 1)  # the last new token is never fed back
    chunk = prefill_chunk or L
    for start in range(0, L, chunk):
        piece = None if seq_idx is None else seq_idx[:, start:start + chunk]
        logits = model(tokens[:, start:start + chunk], seq_idx=piece, cache=cache)[:, -1]

    out: list[list[int]] = [[] for _ in range(B)]
    scores: list[list[float]] = [[] for _ in range(B)]
    finished = [False] * B
    for step in range(max_new_tokens):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        _check_finite(logits, finished, step)
        if greedy:
            new = logits.argmax(dim=-1)
        else:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
            new = torch.multinomial(probs, 1, generator=generator)[:, 0]
        new_list = new.tolist()
        log_probs = logits.log_softmax(dim=-1).gather(-1, new[:, None])[:, 0].tolist() if return_scores else None
        for b in range(B):
            if finished[b]:
                continue
            out[b].append(new_list[b])
            if log_probs is not None:
                scores[b].append(log_probs[b])
            if stream is not None:
                stream(b, new_list[b])
            if new_list[b] in stop:
                finished[b] = True
        if all(finished) or step == max_new_tokens - 1:
            break
        # finished rows keep stepping (on pads) so the batch stays whole; their outputs are unused
        new = torch.where(torch.tensor(finished, device=device), pad_id, new)
        logits = model(new[:, None], cache=cache)[:, -1]
    return (out, scores) if return_scores else out
