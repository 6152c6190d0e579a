"""Measure how far each backend is from `reference` on the conformance cases, and record it.

    python -m tests.measure_errors                      # every op on the CPU: rewrites tests/measured_errors.json
    python -m tests.measure_errors ssd attention        # some ops: replaces only their rows
    python -m tests.measure_errors --device cuda        # the CUDA rows (float32, bfloat16, float16), on a GPU

For every op, backend and dtype that tests/test_conformance.py runs on the device, the largest error
over the op's cases, outputs and gradients apart, exactly as the test compares them (its `compare`):
|backend - reference| / max(1, max |reference|). On the CPU each is measured with 1 and with 2 torch
threads (`make test` runs one thread per xdist worker, a plain pytest run two) and the larger kept;
Triton backends run in the CPU interpreter there (float32 products, whatever the input dtype), on the
"tiny" cases only. Backends that cannot run on the device are recorded as not measured, with the reason.
A full CPU run also measures the comparisons of other tests that keep their own tolerance
(tests/tolerances.py CHECKS: the functions in CHECK_RUNS below, each giving (result, ..., truth)).

tests/tolerances.py sets tolerances at about 10x these numbers; tests/test_tolerances.py fails when one
drifts out of 3x-30x of its measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported, as tests/conftest.py does

import kernels  # noqa: E402
from kernels.triton_utils import single_config, triton  # noqa: E402
from tests.cases import CASES  # noqa: E402
from tests.test_conformance import DTYPES, case_runs, compare, scale_of  # noqa: E402
from tests.test_feedback_chunked import half_precision_run  # noqa: E402
from tests.test_ssd import long_sequence_run  # noqa: E402
from tests.tolerances import CHECKS  # noqa: E402

PATH = Path(__file__).with_name("measured_errors.json")
COMMAND = "python -m tests.measure_errors"
METHOD = ("largest |backend - reference| / max(1, max |reference|) over the conformance cases of tests/cases.py, "
          "outputs (forward) and every float input's gradient apart, as tests/test_conformance.py compares them; "
          "on the CPU the larger of runs with 1 and 2 torch threads")


def key(device: str, op: str, backend: str, dtype: torch.dtype | str) -> str:
    return f"{device}/{op}/{backend}/{str(dtype).removeprefix('torch.')}"


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max()) / scale_of(want) if want.numel() else 0.0


def measure(op_name: str, backend: str, dtype: torch.dtype, device: str) -> dict:
    """Largest forward and gradient errors over the op's cases, with the case that gave each."""
    row = dict(forward=0.0, gradients=0.0, forward_case=None, gradients_case=None, cases=0, declined=None)
    for case in CASES[op_name]:
        if not case_runs(device, backend, case, dtype):
            continue
        with single_config(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pinned backend not validated on cpu": pinned on purpose
            pairs = compare(op_name, backend, case, dtype, device)
        if isinstance(pairs, str):  # the backend declines this case (the test skips it)
            row["declined"] = row["declined"] or pairs
            continue
        row["cases"] += 1
        for name, got, want in pairs:
            part = "forward" if name.startswith("output") else "gradients"
            err = float("inf") if got is None else error(got, want)
            if err > row[part] or row[f"{part}_case"] is None:
                row[part], row[f"{part}_case"] = max(err, row[part]), case.id
    return row


def _round(x: float) -> float:
    return float(f"{x:.2e}")


def where(backend: str, device: str) -> str:
    if device == "cpu" and "triton" in backend:
        return "cpu, Triton interpreter (float32 products; not the GPU's bf16/fp16 tensor-core products)"
    return device if device == "cpu" else torch.cuda.get_device_name()


def run(ops: list[str], device: str, progress=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """{key: row} for every (op, backend, dtype) of `ops` on `device`; rows of backends that cannot run
    there say why instead of carrying numbers."""
    rows = {}
    threads = [1, 2] if device == "cpu" else [torch.get_num_threads()]
    saved = torch.get_num_threads()
    try:
        for op_name in ops:
            op = kernels.get_op(op_name)
            for backend in op.backends:
                if backend == "reference":
                    continue
                why = op.backends[backend].unavailable_reason()
                for dtype in DTYPES[device]:
                    k = key(device, op_name, backend, dtype)
                    if why is not None:
                        rows[k] = dict(not_measured=f"not measured here ({why})")
                        continue
                    runs = []
                    for n in threads:
                        torch.set_num_threads(n)
                        runs.append(measure(op_name, backend, dtype, device))
                        progress(f"{k} ({n} thread{'s' * (n > 1)}): forward {runs[-1]['forward']:.1e}  "
                                 f"gradients {runs[-1]['gradients']:.1e}  over {runs[-1]['cases']} cases")
                    if runs[0]["cases"] == 0:  # the test skips every case: nothing to hold to a tolerance
                        rows[k] = dict(not_measured=f"declines every case ({runs[0]['declined']})")
                        continue
                    fw, gr = (max(runs, key=lambda r: r[part]) for part in ("forward", "gradients"))
                    rows[k] = dict(forward=_round(fw["forward"]), gradients=_round(gr["gradients"]),
                                   forward_case=fw["forward_case"], gradients_case=gr["gradients_case"],
                                   cases=fw["cases"], threads_agree=all(r == runs[0] for r in runs),
                                   measured_on=where(backend, device))
    finally:
        torch.set_num_threads(saved)
    return rows


# tolerances.CHECKS: the other comparisons, each a function of the dtype returning (got, ..., want)
CHECK_RUNS = {"ssd.long_sequence": long_sequence_run, "feedback_solve.half_precision": half_precision_run}


def run_checks(progress=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """{"cpu/<check>/<dtype>": row} for every comparison of tolerances.CHECKS, with 1 and 2 threads."""
    rows, saved = {}, torch.get_num_threads()
    try:
        for name, dtypes in CHECKS.items():
            for dtype in dtypes:
                errors = []
                for n in (1, 2):
                    torch.set_num_threads(n)
                    out = CHECK_RUNS[name](dtype)
                    errors.append(error(out[0].detach(), out[-1].detach()))
                k = f"cpu/{name}/{str(dtype).removeprefix('torch.')}"
                progress(f"{k}: {max(errors):.1e}")
                rows[k] = dict(error=_round(max(errors)), threads_agree=errors[0] == errors[1], measured_on="cpu")
    finally:
        torch.set_num_threads(saved)
    return rows


def environment(device: str) -> dict:
    return dict(device=device if device == "cpu" else torch.cuda.get_device_name(), torch=torch.__version__,
                triton=getattr(triton, "__version__", None), python=platform.python_version(),
                machine=platform.machine(), TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ops", nargs="*", help=f"ops to measure (default: all of {', '.join(CASES)})")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=PATH, help=f"the record to update (default: {PATH.name})")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here")
    ops = args.ops or list(CASES)
    if unknown := [op for op in ops if op not in CASES]:
        parser.error(f"unknown op {unknown[0]!r}: choose from {', '.join(CASES)}")
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = {k: v for k, v in record.get("errors", {}).items()
            if not (k.startswith(f"{args.device}/") and k.split("/")[1] in ops)}
    rows.update(run(ops, args.device))
    if args.device == "cpu":  # what make test-gpu compares stays unmeasured until someone runs --device cuda
        for op_name in ops:
            for backend in kernels.get_op(op_name).backends:
                for dtype in DTYPES["cuda"]:
                    if backend != "reference":
                        rows.setdefault(key("cuda", op_name, backend, dtype),
                                        dict(not_measured="not measured here (needs CUDA: --device cuda on a GPU)"))
    envs = dict(record.get("environment", {}), **{args.device: environment(args.device)})
    checks = record.get("checks", {})
    if args.device == "cpu" and not args.ops:
        checks = run_checks()
    record = dict(command=COMMAND, method=METHOD, environment=envs,
                  errors=dict(sorted(rows.items())), checks=checks)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for k in sorted(rows):
        if k.split("/")[1] in ops:
            r = rows[k]
            print(f"{k:<40} " + (r["not_measured"] if "not_measured" in r else
                                  f"forward {r['forward']:.1e}  gradients {r['gradients']:.1e}"))
    for k, r in checks.items():
        print(f"{k:<40} {r['error']:.1e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
