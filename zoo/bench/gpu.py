"""GPU kernels: correctness of every GPU backend, then time and peak memory of the fused Triton kernels.

1. Checks every backend of every op that can run on the device against `reference` on
   kernels.validation's cases (forward and gradients, float32 and bfloat16); prints one line each.
2. Times forward and forward+backward (best of --repeats, after a warm-up that includes Triton's
   autotuning) and measures peak memory (torch.cuda.max_memory_allocated above the inputs) of
     feedback_solve  triton, chunked, reference (dense T x T; the baseline)
     attention       sdpa (the baseline), xformers, flash_attn (when installed), triton
     ssd             chunked (the baseline), mamba_ssm (when installed), triton
     linear_attention chunked (the baseline), fla (when installed); a decay per key channel (GLA)
     delta_rule      chunked (the baseline), fla (when installed); a decay per head (Gated DeltaNet)
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
from typing import Callable

import torch

import kernels
from kernels.triton_utils import INTERPRET
from zoo.bench import DTYPES, call_seconds, sync

BASELINE = {"feedback_solve": "reference", "attention": "sdpa", "ssd": "chunked", "linear_attention": "chunked",
            "delta_rule": "chunked"}
TIMED = {"feedback_solve": ["reference", "chunked", "triton"], "attention": ["sdpa", "xformers", "flash_attn", "triton"],
         "ssd": ["chunked", "mamba_ssm", "triton"], "linear_attention": ["chunked", "fla"], "delta_rule": ["chunked", "fla"]}


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
def feedback_inputs(B: int, T: int, D: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(T + D)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    gamma = (torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0) * 0.999).to(device=device, dtype=dtype)
    return (r(B, T, D), r(B, T, D), r(B, T, D), gamma), {}


def attention_inputs(B: int, T: int, H: int, d: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(T + d)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return (r(B, T, H, d), r(B, T, H, d), r(B, T, H, d)), {}


def ssd_inputs(B: int, T: int, H: int, P: int, N: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(T + N)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, generator=g) - 1).to(device=device, dtype=dtype)
    A = (-torch.exp(torch.randn(H, generator=g) * 0.5)).to(device=device, dtype=dtype)
    return (r(B, T, H, P), dt, A, r(B, T, 1, N), r(B, T, 1, N)), dict(chunk_size=64)


def state_inputs(op: str, B: int, T: int, H: int, d: int, dtype: torch.dtype, device: torch.device):
    """linear_attention with a decay per key channel, or delta_rule with unit keys and a decay per head."""
    g = torch.Generator(device="cpu").manual_seed(T + d)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    decay = lambda *s: torch.nn.functional.logsigmoid(torch.randn(*s, generator=g) * 2 + 2).to(device)  # noqa: E731
    if op == "linear_attention":
        return (r(B, T, H, d), r(B, T, H, d), r(B, T, H, d), decay(B, T, H, d)), dict(chunk_size=64)
    keys = torch.nn.functional.normalize(torch.randn(B, T, H, d, generator=g), dim=-1).to(device=device, dtype=dtype)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g)).to(device=device, dtype=dtype)
    return (r(B, T, H, d), keys, r(B, T, H, d), beta, decay(B, T, H)), dict(chunk_size=64)


def run_checks(device: torch.device, tiny: bool) -> bool:
    """Every backend that runs on the device against reference on kernels.validation's cases (the
    largest in half precision only), float32 and bfloat16; prints the table, nothing stored."""
    from kernels import OPS, validation

    cases = {op: cs[-1:] for op, cs in validation.CASES.items()} if tiny else None
    saved = dict(validation.CASES)
    validation.CASES.update(cases or {})
    try:
        ok = True
        for op in validation.CASES:
            backends = [b for b in OPS[op].backends if b != "reference"]
            report = validation.validate([op], backends, device, (torch.float32, torch.bfloat16), store=False, quick=True)
            print(report)
            ok &= report.ok
    finally:
        validation.CASES.clear()
        validation.CASES.update(saved)
    print()
    return ok


def _leaves(args, kwargs):
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(best milliseconds, peak MiB above what was allocated before) of fn(), after one warm-up call."""
    times = call_seconds(fn, device, repeats)
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
        return attention_inputs(B, T, H, D // H, dtype, device)
    if op_name in ("linear_attention", "delta_rule"):
        return state_inputs(op_name, B, T, H, D // H, dtype, device)
    return ssd_inputs(B, T, H, D // H, args.state, dtype, device)


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
    header = (f"{'op':<16} {'backend':<10} {'T':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9} "
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
                print(f"{op_name:<16} {backend:<10} {T:>6} {_fmt(r.get('fwd'), '9.2f')} {_fmt(r.get('fwdbwd'), '11.2f')} "
                      f"{_fmt(r.get('fwdbwd_mem'), '9.0f')} {_fmt(ratio('fwd'), '7.2f')} {_fmt(ratio('fwdbwd'), '7.2f')} "
                      f"{_fmt(ratio('fwdbwd_mem'), '7.2f')}  {r.get('note', '')}")
        print()
    if not ok:
        raise SystemExit("some backends failed the correctness check (see above)")
