"""GPU kernels: correctness of every GPU backend, then time and peak memory of the fused Triton kernels.

1. Checks every backend of attention, feedback_solve and ssd that can run on the device against
   `reference` on small shapes (forward and gradients, float32 and bfloat16); prints one line each.
2. Times forward and forward+backward (best of --repeats, after a warm-up that includes Triton's
   autotuning) and measures peak memory (torch.cuda.max_memory_allocated above the inputs) of
     feedback_solve  triton, chunked, reference (dense T x T; the baseline)
     attention       sdpa (the baseline), xformers (when installed), triton
     ssd             chunked (the baseline), triton
   at --dtype (bfloat16), width --dim 1024 with --heads 16 (head dim 64; ssd: P = 64, N = --state),
   for each T in --lengths (2048 ... 16384); one table, ratios to each op's baseline.

    python tools/bench.py gpu --device cuda
    python tools/bench.py gpu --device cuda --lengths 2048,4096 --repeats 5 --skip-check

Needs CUDA. On a CPU-only machine it stops with "needs CUDA" (a smoke run of the code path on tiny
shapes works with TRITON_INTERPRET=1 and --device cpu; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch

import kernels
from kernels.triton_utils import INTERPRET
from zoo.bench import DTYPES, sync

CHECK_TOL = {torch.float32: 2e-3, torch.bfloat16: 4e-2, torch.float16: 1e-2}  # max error / max |reference|
BASELINE = {"feedback_solve": "reference", "attention": "sdpa", "ssd": "chunked"}
TIMED = {"feedback_solve": ["reference", "chunked", "triton"], "attention": ["sdpa", "xformers", "triton"],
         "ssd": ["chunked", "triton"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--dim", type=int, default=1024, help="model width D (feedback solve: D = Dk)")
    parser.add_argument("--heads", type=int, default=16, help="attention / ssd heads (head dim = dim / heads)")
    parser.add_argument("--state", type=int, default=128, help="ssd state size N")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-check", action="store_true", help="skip the correctness checks")


# ------------------------------------------------------------------------------------------ inputs
def _segments(lengths: list[int], B: int, device: torch.device) -> torch.Tensor:
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    return ids[None].expand(B, -1).contiguous()


def feedback_inputs(B: int, T: int, D: int, dtype: torch.dtype, device: torch.device, P: int = 0,
                    packed: list[int] | None = None):
    g = torch.Generator(device="cpu").manual_seed(T + D)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    gamma = (torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0) * 0.999).to(device=device, dtype=dtype)
    kw = {}
    if P:
        kw.update(past_k=r(B, P, D), past_s=r(B, P, D))
    if packed:
        kw["seq_idx"] = _segments(packed, B, device)
    return (r(B, T, D), r(B, T, D), r(B, T, D), gamma), kw


def attention_inputs(B: int, Tq: int, S: int, H: int, Hkv: int, d: int, dtype: torch.dtype, device: torch.device,
                     window: int | None = None, packed: list[int] | None = None):
    g = torch.Generator(device="cpu").manual_seed(S + d)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    kw = {}
    if window:
        kw["window"] = window
    if packed:
        kw["seq_idx"] = _segments(packed, B, device)
    return (r(B, Tq, H, d), r(B, S, Hkv, d), r(B, S, Hkv, d)), kw


def ssd_inputs(B: int, T: int, H: int, P: int, G: int, N: int, dtype: torch.dtype, device: torch.device,
               init: bool = False, packed: list[int] | None = None):
    g = torch.Generator(device="cpu").manual_seed(T + N)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, generator=g) - 1).to(device=device, dtype=dtype)
    A = (-torch.exp(torch.randn(H, generator=g) * 0.5)).to(device=device, dtype=dtype)
    kw = dict(chunk_size=64)
    if init:
        kw["initial_state"] = r(B, H, P, N)
    if packed:
        kw["seq_idx"] = _segments(packed, B, device)
    return (r(B, T, H, P), dt, A, r(B, T, G, N), r(B, T, G, N)), kw


def check_cases(device: torch.device, dtype: torch.dtype, tiny: bool):
    """(op name, case name, args, kwargs) on small shapes; `tiny` for the CPU interpreter."""
    if tiny:
        return [("feedback_solve", "T21-past-packed", *feedback_inputs(2, 21, 32, dtype, device, P=5, packed=[6, 1, 19])),
                ("attention", "Tq7-S9-gqa-window", *attention_inputs(2, 7, 9, 4, 2, 32, dtype, device, window=4)),
                ("ssd", "T20-init-packed", *ssd_inputs(2, 20, 2, 16, 1, 16, dtype, device, init=True, packed=[5, 15]))]
    return [
        ("feedback_solve", "T300-D128", *feedback_inputs(2, 300, 128, dtype, device)),
        ("feedback_solve", "T200-D96-past50-packed",
         *feedback_inputs(2, 200, 96, dtype, device, P=50, packed=[70, 1, 179])),
        ("attention", "T257-H4-Hkv2-d64", *attention_inputs(2, 257, 257, 4, 2, 64, dtype, device)),
        ("attention", "Tq100-S300-Hkv1-d128-window64-packed",
         *attention_inputs(2, 100, 300, 4, 1, 128, dtype, device, window=64, packed=[120, 1, 179])),
        ("ssd", "T300-H4-P64-G2-N64-init-packed",
         *ssd_inputs(2, 300, 4, 64, 2, 64, dtype, device, init=True, packed=[100, 1, 199])),
        ("ssd", "T129-H2-P32-N128", *ssd_inputs(1, 129, 2, 32, 1, 128, dtype, device)),
    ]


# ------------------------------------------------------------------------------------------ checks
def _leaves(args, kwargs):
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _forward_backward(op, backend: str, args, kwargs):
    """Output(s) and gradients of <output, fixed random cotangent> for every float input."""
    args = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)
    kwargs = {k: v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
              else v for k, v in kwargs.items()}
    out = op(*args, backend=backend, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device="cpu").manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, _leaves(args, kwargs), allow_unused=True)


def run_checks(device: torch.device, tiny: bool) -> bool:
    print("correctness against reference (max |error| / max |reference|, forward and gradients)")
    print(f"{'op':<15} {'backend':<10} {'dtype':<9} {'case':<38} {'forward':>9} {'grads':>9}  result")
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for op_name, case, args, kwargs in check_cases(device, dtype, tiny):
            op = kernels.get_op(op_name)
            want, want_grads = _forward_backward(op, "reference", args, kwargs)
            for name, backend in op.backends.items():
                if name == "reference":
                    continue
                why = backend.reason(*args, **kwargs)
                if why is not None:
                    print(f"{op_name:<15} {name:<10} {str(dtype)[6:]:<9} {case:<38} {'':>9} {'':>9}  skipped: {why}")
                    continue
                got, got_grads = _forward_backward(op, name, args, kwargs)
                err = lambda g, w: ((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-6)).item()  # noqa: E731
                fwd = max(err(g, w) for g, w in zip(got, want))
                grads = max((err(g, w) for g, w in zip(got_grads, want_grads) if w is not None), default=0.0)
                if any(g is None for g, w in zip(got_grads, want_grads) if w is not None):
                    grads = math.inf
                good = max(fwd, grads) <= CHECK_TOL[dtype] and math.isfinite(fwd)
                ok &= good
                print(f"{op_name:<15} {name:<10} {str(dtype)[6:]:<9} {case:<38} {fwd:9.1e} {grads:9.1e}  "
                      f"{'ok' if good else 'FAIL (tolerance ' + format(CHECK_TOL[dtype], '.0e') + ')'}")
    print()
    return ok


# ------------------------------------------------------------------------------------------ timing
def _measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(best milliseconds, peak MiB above what was allocated before) of fn(), after one warm-up call."""
    fn()  # warm-up: compilation and autotuning
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = math.nan
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return min(times) * 1e3, peak


def _timed_inputs(op_name: str, args: argparse.Namespace, T: int, device: torch.device, dtype: torch.dtype):
    D, H, B = args.dim, args.heads, args.batch
    if op_name == "feedback_solve":
        return feedback_inputs(B, T, D, dtype, device)
    if op_name == "attention":
        return attention_inputs(B, T, T, H, H, D // H, dtype, device)
    return ssd_inputs(B, T, H, D // H, 1, args.state, dtype, device)


def time_backend(op_name: str, backend: str, inputs, device: torch.device, repeats: int) -> dict[str, float | str]:
    op = kernels.get_op(op_name)
    in_args, in_kwargs = inputs
    why = op.backends[backend].reason(*in_args, **in_kwargs)
    if why is not None:
        return {"note": why}
    leaves = _leaves(in_args, in_kwargs)
    for t in leaves:
        t.requires_grad_(True)

    def forward():
        with torch.no_grad():
            return op(*in_args, backend=backend, **in_kwargs)

    def forward_backward():
        out = op(*in_args, backend=backend, **in_kwargs)
        return torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)

    result: dict[str, float | str] = {}
    try:
        result["fwd"], result["fwd_mem"] = _measure(forward, device, repeats)
        result["fwdbwd"], result["fwdbwd_mem"] = _measure(forward_backward, device, repeats)
    except torch.cuda.OutOfMemoryError:
        result["note"] = "out of memory"
    finally:
        for t in leaves:
            t.requires_grad_(False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _fmt(x: float | None, spec: str) -> str:
    """format(x, spec), or a dash of the same width for a missing value."""
    missing = x is None or math.isnan(x)
    return f"{'-':>{int(spec.split('.')[0])}}" if missing else format(x, spec)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu benchmark needs CUDA: torch.cuda.is_available() is False on this machine")
    if device.type != "cuda" and not (device.type == "cpu" and INTERPRET):
        raise SystemExit(f"gpu benchmark needs CUDA (got --device {args.device}; a CPU smoke run needs TRITON_INTERPRET=1)")
    if args.dim % args.heads:
        raise SystemExit(f"--dim ({args.dim}) must be a multiple of --heads ({args.heads})")
    dtype = DTYPES[args.dtype]
    lengths = [int(t) for t in args.lengths.split(",") if t.strip()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter smoke run)"
    print(f"device: {name}; torch {torch.__version__}\n")

    ok = True if args.skip_check else run_checks(device, tiny=device.type == "cpu")

    print(f"timings: {args.dtype}, B={args.batch}, D={args.dim}, {args.heads} heads, ssd N={args.state}; "
          f"best of {args.repeats}; ratios to each op's baseline ({', '.join(f'{k}: {v}' for k, v in BASELINE.items())})")
    header = (f"{'op':<15} {'backend':<10} {'T':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9} "
              f"{'fwd x':>7} {'f+b x':>7} {'mem x':>7}  note")
    print(header)
    print("-" * len(header))
    for op_name, backends in TIMED.items():
        for T in lengths:
            inputs = _timed_inputs(op_name, args, T, device, dtype)
            rows = {b: time_backend(op_name, b, inputs, device, args.repeats) for b in backends
                    if b in kernels.get_op(op_name).backends}
            base = rows.get(BASELINE[op_name], {})
            for backend, r in rows.items():
                ratio = lambda key: (r[key] / base[key]) if key in r and key in base else None  # noqa: E731
                print(f"{op_name:<15} {backend:<10} {T:>6} {_fmt(r.get('fwd'), '9.2f')} {_fmt(r.get('fwdbwd'), '11.2f')} "
                      f"{_fmt(r.get('fwdbwd_mem'), '9.0f')} {_fmt(ratio('fwd'), '7.2f')} {_fmt(ratio('fwdbwd'), '7.2f')} "
                      f"{_fmt(ratio('fwdbwd_mem'), '7.2f')}  {r.get('note', '')}")
        print()
    if not ok:
        raise SystemExit("some backends failed the correctness check (see above)")
