"""One short GPU check (a few minutes on one H100 / H200 from a cold Triton cache).

    python tools/gpu_check.py                  # CUDA: prints a table, writes gpu_check.json and gpu_check.md
    python tools/gpu_check.py --dry-run        # anywhere: tiny shapes on CPU, Triton in its interpreter
    python tools/gpu_check.py --count-compiles # no GPU needed: the Triton compilations a cold run does
    python tools/gpu_check.py --resources      # no GPU needed: shared memory / registers / spills on sm_90

1. Versions: device, torch, CUDA, Triton, xformers, flash-attn, mamba-ssm, flash-linear-attention.
2. Correctness: every backend of every op that can run on the device against `reference` (float64)
   on kernels.validation's cases (odd lengths, GQA, windows, segments, caches, strided views, large
   head and state dims: bfloat16 only unless --store), float32 and bfloat16, forward and every
   gradient, one autotune config per Triton kernel (kernels.triton_utils.single_config). `--store`
   runs the full set and records the verdicts, as `tools/validate.py` would.
3. Speed at B = 1, T = 8192, D = 1024, 16 heads (head dim 64; ssd: P = 64, N = 128; linear
   attention: a decay per key channel (GLA); delta rule: a decay per head (Gated DeltaNet)), bfloat16:
   each backend's forward against the op's baseline (attention: SDPA forced to its flash kernel; the
   others: `chunked`), then median forward and forward + backward times, as ratios to SDPA's flash
   kernel on attention. The SDPA row says which kernel SDPA picks by itself.
Every error (compilation, out of resources, a wrong result) is a failed row, never an abort; the exit
status is 1 when a row failed.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from zoo import cli

ROWS_TOL = {torch.float32: 2e-3, torch.bfloat16: 4e-2}
# FLA's kernels multiply float32 operands in TF32 (Triton's default on NVIDIA GPUs): about float16 precision
TF32_TOL = {("linear_attention", "fla"): 1e-2, ("delta_rule", "fla"): 1e-2}
BASELINE = {"attention": "sdpa[flash]", "feedback_solve": "chunked", "ssd": "chunked", "linear_attention": "chunked",
            "delta_rule": "chunked"}


@dataclass
class Row:
    part: str  # "correctness" or "speed"
    op: str
    backend: str
    case: str
    dtype: str
    error: float | None = None  # relative to reference (correctness) or to the baseline (speed)
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_x: float | None = None  # ratio to SDPA flash attention
    fwdbwd_x: float | None = None
    result: str = ""  # ok / FAIL ... / skipped: ... / error: ...


def versions(device: torch.device) -> dict[str, str]:
    def v(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter, dry run)"
    return {"device": name, "torch": torch.__version__, "CUDA": torch.version.cuda or "none", "triton": v("triton"),
            "xformers": v("xformers"), "flash-attn": v("flash-attn"), "mamba-ssm": v("mamba-ssm"),
            "flash-linear-attention": v("flash-linear-attention")}


# ------------------------------------------------------------------------------------------ correctness
def correctness(device: torch.device, store: bool, dry_run: bool) -> list[Row]:
    from kernels import OPS, validation
    from kernels.triton_utils import single_config

    rows = []
    cases = {op: (cs[-1:] if dry_run else cs) for op, cs in validation.CASES.items()}
    if dry_run:  # the smallest case of each op, shrunk further for the interpreter
        cases = {"attention": [validation.attention_case("dry-T9-gqa-window", 1, 9, 9, 2, 1, 16, window=4)],
                 "feedback_solve": [validation.feedback_case("dry-T9-past3", 1, 9, 16, P=3)],
                 "ssd": [validation.ssd_case("dry-T9-init", 1, 9, 2, 16, 1, 16, init=True)],
                 "linear_attention": [validation.state_case("dry-T9-gkey-init", "linear_attention", 1, 9, 2, 8, 8, "key",
                                                            init=True)],
                 "delta_rule": [validation.state_case("dry-T9-g-init", "delta_rule", 1, 9, 2, 8, 8, "head", init=True)]}
    saved = dict(validation.CASES)
    validation.CASES.update(cases)
    try:
        with single_config():
            for op in cases:
                backends = [b for b in OPS[op].backends if b != "reference"]
                report = validation.validate([op], backends, device, (torch.float32, torch.bfloat16), store=store,
                                             quick=not store,
                                             progress=lambda r: print(f"  checked {r.op}/{r.backend} {r.case} {r.dtype}",
                                                                      file=sys.stderr, flush=True))
                for r in report.rows:
                    tol = row_tolerance(r.op, r.backend, getattr(torch, r.dtype))
                    err = None if not r.ran or math.isinf(r.forward) else max(r.forward, r.grads)
                    result = r.note if err is None else ("ok" if err <= tol else f"FAIL (> {tol:.0e})")
                    rows.append(Row("correctness", r.op, r.backend, r.case, r.dtype, error=err, result=result))
    finally:
        validation.CASES.clear()
        validation.CASES.update(saved)
    return rows


def row_tolerance(op: str, backend: str, dtype: torch.dtype) -> float:
    """The largest error a correctness row may show: ROWS_TOL, looser for float32 products in TF32."""
    return TF32_TOL.get((op, backend), ROWS_TOL[dtype]) if dtype == torch.float32 else ROWS_TOL[dtype]


# ------------------------------------------------------------------------------------------ speed
def _time(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() after one warm-up call (compilation and autotuning)."""
    from zoo.bench import call_seconds

    return 1e3 * statistics.median(call_seconds(fn, device, repeats))


def _sdpa_kernel_picked(q, k, v) -> str:
    """The kernel SDPA chooses for these (B, T, H, d) inputs with a causal mask."""
    try:
        choice = torch._fused_sdp_choice(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        return torch.nn.attention.SDPBackend(choice).name.lower()
    except Exception as e:  # private API: name what is known
        return f"unknown ({type(e).__name__})"


def speed_inputs(device: torch.device, B: int, T: int, D: int, H: int, N: int) -> dict[str, tuple[tuple, dict]]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=torch.bfloat16)  # noqa: E731
    d = D // H
    gamma = (torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0) * 0.99).to(device, torch.bfloat16)
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, generator=g) - 1).to(device)
    A = -torch.exp(torch.randn(H, generator=g) * 0.5).to(device)
    decay = lambda *s: torch.nn.functional.logsigmoid(torch.randn(*s, generator=g) * 2 + 2).to(device)  # noqa: E731
    unit_keys = torch.nn.functional.normalize(torch.randn(B, T, H, d, generator=g), dim=-1).to(device, torch.bfloat16)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g)).to(device, torch.bfloat16)
    return {"attention": ((r(B, T, H, d), r(B, T, H, d), r(B, T, H, d)), {}),
            "feedback_solve": ((r(B, T, D), r(B, T, D), r(B, T, D), gamma), {}),
            "ssd": ((r(B, T, H, d), dt, A, r(B, T, 1, N), r(B, T, 1, N)), dict(chunk_size=64)),
            "linear_attention": ((r(B, T, H, d), r(B, T, H, d), r(B, T, H, d), decay(B, T, H, d)), dict(chunk_size=64)),
            "delta_rule": ((r(B, T, H, d), unit_keys, r(B, T, H, d), beta, decay(B, T, H)), dict(chunk_size=64))}


def speed(device: torch.device, repeats: int, dry_run: bool) -> list[Row]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels import OPS
    from kernels.validation import relative_error

    B, T, D, H, N = (1, 64, 64, 2, 16) if dry_run else (1, 8192, 1024, 16, 128)
    shape = f"B{B}-T{T}-D{D}-H{H}" + ("" if dry_run else f"-N{N}")
    inputs = speed_inputs(device, B, T, D, H, N)
    rows, base_times = [], {}

    def run(op, backend, args, kwargs, grad):
        args = tuple(a.detach().requires_grad_(grad) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        out = OPS[op](*args, backend=backend.split("[")[0], **kwargs)
        if grad:
            out.float().sum().backward()
        return out

    for op, (args, kwargs) in inputs.items():
        names = (["sdpa[flash]"] if op == "attention" else []) + [b for b in OPS[op].backends if b != "reference"]
        baseline = None
        for name in names:
            row = Row("speed", op, name, shape, "bfloat16")
            rows.append(row)
            forced = (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)) if name == "sdpa[flash]" else None
            why = OPS[op].backends[name.split("[")[0]].reason(*args, **kwargs)
            if why is not None:
                row.result = f"skipped: {why}"
                continue
            try:
                with forced() if forced else _nullcontext():
                    with torch.no_grad():
                        out = run(op, name, args, kwargs, False)
                    if name == BASELINE[op]:
                        baseline = out.float()
                    row.error = 0.0 if baseline is None or name == BASELINE[op] else relative_error(out.float(), baseline)
                    row.fwd_ms = _time(lambda: _no_grad(run, op, name, args, kwargs), device, repeats)
                    row.fwdbwd_ms = _time(lambda: run(op, name, args, kwargs, True), device, repeats)
                if name == "sdpa[flash]":
                    base_times = {"fwd": row.fwd_ms, "fwdbwd": row.fwdbwd_ms}
                tol = ROWS_TOL[torch.bfloat16]
                row.result = "ok" if row.error is not None and row.error <= tol else f"FAIL (error > {tol:.0e} vs {BASELINE[op]})"
                if name == "sdpa":
                    row.result += f"; SDPA picks {_sdpa_kernel_picked(*args)}"
            except Exception as e:  # every kernel error is a failed row
                row.result = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    for row in rows:
        if row.fwd_ms is not None and base_times:
            row.fwd_x, row.fwdbwd_x = row.fwd_ms / base_times["fwd"], row.fwdbwd_ms / base_times["fwdbwd"]
    return rows


def _no_grad(run, *args):
    with torch.no_grad():
        return run(*args, False)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------ output
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(info: dict[str, str], rows: list[Row], seconds: float) -> str:
    lines = ["| " + " | ".join(f"{k}: {v}" for k, v in info.items()) + " |", "|" + "---|" * len(info), "",
             f"`python tools/gpu_check.py`, {seconds:.0f} s in all.", "",
             "| part | op | backend | case | dtype | error | fwd ms | fwd+bwd ms | fwd x | fwd+bwd x | result |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.part} | {r.op} | {r.backend} | {r.case} | {r.dtype} | {_fmt(r.error, '.1e')} | "
                     f"{_fmt(r.fwd_ms, '.2f')} | {_fmt(r.fwdbwd_ms, '.2f')} | {_fmt(r.fwd_x, '.2f')} | "
                     f"{_fmt(r.fwdbwd_x, '.2f')} | {r.result} |")
    return "\n".join(lines) + "\n"


def failed(rows: list[Row]) -> list[Row]:
    return [r for r in rows if not (r.result.startswith("ok") or r.result.startswith("skipped"))]


def count_compiles() -> None:
    """The Triton compilations a cold run of this check does, counted on any machine (nothing compiled)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import kernels
    from kernels import validation
    from kernels.triton_target import virtual_gpu
    from kernels.triton_utils import single_config

    cpu = torch.device("cpu")
    with virtual_gpu(compile=False) as seen:
        with single_config():
            for op, cases in validation.CASES.items():
                if "triton" not in kernels.get_op(op).backends:
                    continue
                fn = kernels.get_op(op).backends["triton"].fn
                for case in cases:
                    for dtype in (torch.bfloat16,) if case.large else (torch.float32, torch.bfloat16):
                        args, kwargs = validation._leafy(*case.make(dtype, cpu))
                        out = fn(*args, **kwargs)
                        out = out[0] if isinstance(out, tuple) else out
                        out.float().sum().backward()
        for op, (args, kwargs) in speed_inputs(cpu, 1, 8192, 1024, 16, 128).items():
            if "triton" not in kernels.get_op(op).backends:
                continue
            args = tuple(a.detach().requires_grad_(True) if a.is_floating_point() else a for a in args)
            kernels.get_op(op).backends["triton"].fn(*args, **kwargs).float().sum().backward()
    by_kernel = seen.by_kernel()
    for name, reports in sorted(by_kernel.items()):
        print(f"{name:<26} {len(reports):>3}")
    print(f"{'total':<26} {len(seen.compiled):>3} compilations for {seen.launches} launches")


def resources(only: str = "") -> None:
    """Compile the largest-shape variants of the Triton kernels for sm_90 (slow: float32 ones take
    minutes) and print shared memory, registers, spills and compile time of each."""
    os.environ.pop("TRITON_INTERPRET", None)
    import kernels.attention.triton as at
    import kernels.ssd.triton as sd
    from kernels.triton_target import compile_kernel
    from kernels.triton_tril import inverse_kernel
    from kernels.triton_utils import tl

    def st(t):
        return t.stride(0), t.stride(1), t.stride(2)

    jobs = []
    w, inv = torch.empty(2, 512, 1000), torch.empty(2, 8, 64, 64)
    jobs.append((inverse_kernel, (w, inv, 0, 8, 512, 0, w.stride(0), w.stride(1)), dict(BT=64), dict(num_warps=4)))
    T, H, P, N, Q = 1024, 2, 128, 128, 64
    for dt, DOT in ((torch.bfloat16, tl.bfloat16), (torch.float32, tl.float32)):
        xd, cs, st_ = torch.empty(1, T, H, P), torch.empty(1, T, H), torch.empty(1, T // Q + 1, H, P, N)
        Bm = torch.empty(1, T, 1, N, dtype=dt)
        meta = dict(Q=Q, PB=sd._p_block(P, dt), BN=N, DOT=DOT, HAS_SEG=True)
        jobs.append((sd._chunk_scan_bwd_kernel, (xd, cs, Bm, Bm, cs, cs, st_, st_, xd, cs, xd, Bm, Bm, cs, cs, cs, T, H,
                                                 2, P, N, *st(Bm), *st(Bm), 0, 1024), meta, dict(num_warps=4)))
        jobs.append((sd._chunk_scan_kernel, (xd, cs, Bm, Bm, cs, st_, cs, xd, T, H, 2, P, N, *st(Bm), *st(Bm), 0, 1024),
                     meta, dict(num_warps=4)))
    q, lse = torch.empty(1, T, H, 256, dtype=torch.bfloat16), torch.empty(1, H, T)
    meta = dict(HAS_WINDOW=True, HAS_SEG=True, DOT=tl.bfloat16, BD=256, BDV=256)
    for c in at._FWD_CONFIGS:
        c = dict(c)
        launch = dict(num_warps=c.pop("num_warps"), num_stages=c.pop("num_stages"))
        jobs.append((at._fwd_kernel, (q, q, q, q, lse, lse, T, T, H, 1, 64, 0.1, 256, 256, *st(q) * 4, 0, 1024),
                     dict(meta, **c), launch))
    for kernel, args, kwargs, launch in jobs:
        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        if only in name:
            print(compile_kernel(kernel, args, kwargs, **launch).row(), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU in Triton's interpreter")
    parser.add_argument("--count-compiles", action="store_true", help="count the Triton compilations of a cold run")
    parser.add_argument("--resources", nargs="?", const="", metavar="NAME",
                        help="compile the largest variants for sm_90 and report their resources (only kernels named NAME*)")
    parser.add_argument("--out", default="gpu_check", help="writes OUT.json and OUT.md")
    parser.add_argument("--repeats", type=cli.positive_int, default=10)
    parser.add_argument("--store", action="store_true", help="store the correctness verdicts as validation results")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    if args.count_compiles:
        count_compiles()
        return
    if args.resources is not None:
        resources(args.resources)
        return
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported
    elif not torch.cuda.is_available():
        parser.error("needs CUDA (torch.cuda.is_available() is False); --dry-run runs the code path on CPU")
    start = time.perf_counter()
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    info = versions(device)
    print("  ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    rows = correctness(device, args.store, args.dry_run)
    if not args.skip_speed:
        rows += speed(device, 2 if args.dry_run else args.repeats, args.dry_run)
    seconds = time.perf_counter() - start
    text = markdown(info, rows, seconds)
    print(text)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(versions=info, seconds=seconds, rows=[asdict(r) for r in rows]), f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    bad = failed(rows)
    print(f"{len(rows)} rows, {len(bad)} failed; wrote {args.out}.json and {args.out}.md")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    cli.run(main)
