"""The matrix-state ops: `chunked` vs the token-by-token `reference` and vs causal attention, forward
and forward + backward, over T.

Three workloads, one per decay shape the ops take:
    gla           linear_attention with a log decay per key channel (B, T, H, dk)
    retnet        linear_attention with a log decay per head (B, T, H)
    gated-delta   delta_rule with a log decay per head, unit keys, beta in (0, 1)
    ssd           Mamba-2's ssd (on request: --workloads ssd), state size N = dk, head dim P = dv,
                  one group of B and C, dt = softplus(N(0, 1) - 4), A in [-1.5, -0.5]
Defaults: B=4, H=4, dk=32, dv=64 (GLA at width 256: dk = 0.5 * 256 / 4), float32, 2 threads,
T in 16 32 64 128 256 1024. Each time is the best of --repeats; the backends alternate inside every
repeat so both see the same machine load; the ratio is reference / chunked (above 1: chunked is
faster). The reference is skipped above --max-reference-T (it is linear in T; extrapolate).
The attention columns time the `attention` op on `sdpa` (causal, B and H as above, head dim
--attention-head-dim, default 64: the attention layer of width 256 with 4 heads) in the same
rotation; their ratio is attention / chunked (above 1: the recurrence is faster).

    python tools/bench.py recurrence
    python tools/bench.py recurrence --T 256 1024 4096 --max-reference-T 1024
    python tools/bench.py recurrence --workloads gated-delta --dk 48 --dv 96 --T 2048 --chunk-size 16 32 64
    python tools/bench.py recurrence --workloads ssd --T 1024 --batch 2 --heads 8 --dk 64 --dv 64
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kernels.attention import attention
from kernels.delta_rule import delta_rule
from kernels.linear_attention import linear_attention
from kernels.ssd import ssd

WORKLOADS = ("gla", "retnet", "gated-delta", "ssd")
OPS = {"gla": linear_attention, "retnet": linear_attention, "gated-delta": delta_rule, "ssd": ssd}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--T", type=int, nargs="+", default=[16, 32, 64, 128, 256, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dk", type=int, default=32)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[64],
                        help="chunk sizes of the chunked backend (one row each, timed in the same rotation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-reference-T", type=int, default=1024)
    parser.add_argument("--attention-head-dim", type=int, default=64)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS[:3]))


def inputs(workload: str, B: int, T: int, H: int, dk: int, dv: int) -> list[torch.Tensor]:
    if workload == "ssd":  # x, dt, A, B, C
        return [torch.randn(B, T, H, dv), F.softplus(torch.randn(B, T, H) - 4), -0.5 - torch.rand(H),
                torch.randn(B, T, 1, dk), torch.randn(B, T, 1, dk)]
    q, v = torch.randn(B, T, H, dk), torch.randn(B, T, H, dv)
    k = F.normalize(torch.randn(B, T, H, dk), dim=-1)
    if workload == "gla":
        return [q, k, v, F.logsigmoid(torch.randn(B, T, H, dk)) / 16]
    if workload == "retnet":
        return [q, k, v, torch.log(1 - 2.0 ** (-5.0 - torch.arange(H))).expand(B, T, H).contiguous()]
    return [q, k, v, torch.sigmoid(torch.randn(B, T, H)), -F.softplus(torch.randn(B, T, H))]


def timed(workload: str, backend: str, xs: list[torch.Tensor], chunk_size: int, backward: bool) -> float:
    """Seconds of one call of the workload's op on `backend` ("attention": the attention op on xs)."""
    op, options = OPS[workload], dict(chunk_size=chunk_size, backend=backend)
    if backend == "attention":
        op, options = attention, dict(backend="sdpa")
    start = time.perf_counter()
    if backward:
        leaves = [x.detach().requires_grad_(True) for x in xs]
        op(*leaves, **options).sum().backward()
    else:
        with torch.no_grad():
            op(*xs, **options)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"reference vs chunked vs attention: float32, B={args.batch}, H={args.heads}, dk={args.dk}, dv={args.dv}, "
          f"attention head dim {args.attention_head_dim}, {args.threads} threads, best of {args.repeats}; "
          f"ratios: reference / chunked, attention / chunked")
    print("| workload | T | C | forward ref ms | forward chunked ms | ref / chunked | forward attention ms "
          "| attention / chunked | fwd+bwd ref ms | fwd+bwd chunked ms | ref / chunked | fwd+bwd attention ms "
          "| attention / chunked |")
    print("|---|---:|---:|" + "---:|" * 10)
    for workload in args.workloads:
        for T in args.T:
            recurrence_inputs = inputs(workload, args.batch, T, args.heads, args.dk, args.dv)
            runs = {("chunked", C): recurrence_inputs for C in args.chunk_size}  # (backend, chunk size): inputs
            runs["attention", None] = [torch.randn(args.batch, T, args.heads, args.attention_head_dim) for _ in range(3)]
            if T <= args.max_reference_T:
                runs["reference", None] = recurrence_inputs
            best = {(run, bw): float("inf") for run in runs for bw in (False, True)}
            for _ in range(args.repeats):
                for backward in (False, True):
                    for (backend, C), xs in runs.items():
                        seconds = timed(workload, backend, xs, C or args.chunk_size[0], backward)
                        best[(backend, C), backward] = min(best[(backend, C), backward], seconds)
            for C in args.chunk_size:
                cells = []
                for backward in (False, True):
                    ref, attn = best.get((("reference", None), backward)), best[("attention", None), backward]
                    chunked = best[("chunked", C), backward]
                    cells += [f"{ref * 1e3:.1f}" if ref else "-", f"{chunked * 1e3:.1f}",
                              f"{ref / chunked:.1f}x" if ref else "-", f"{attn * 1e3:.1f}", f"{attn / chunked:.2f}x"]
                print(f"| {workload} | {T} | {C} | " + " | ".join(cells) + " |", flush=True)
