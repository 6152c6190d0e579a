"""Validate backends on this device: check them against `reference` and remember the verdict, so
that automatic selection may pick them here (kernels.validation).

    python tools/validate.py                         # every backend that needs validation, current device
    python tools/validate.py --ops attention --device cuda:1
    python tools/validate.py --backends sdpa,xformers  # check others too (they need no validation)
    python tools/validate.py --show                  # stored verdicts for this device, nothing run
    python tools/validate.py --forget                # drop this device's verdicts

Exits with status 1 when a checked backend fails. Results: the file printed at the end.
"""

from __future__ import annotations

import sys

import torch

import kernels
from kernels import validation
from zoo import cli


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    parser.add_argument("--backends", default="", help="comma-separated backends (default: those that need validation)")
    parser.add_argument("--device", default=None, help="default: the current CUDA device, else cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-store", action="store_true", help="check only; leave the stored verdicts alone")
    parser.add_argument("--show", action="store_true", help="print the stored verdicts for the device and exit")
    parser.add_argument("--forget", action="store_true", help="drop the stored verdicts for the device and exit")
    args = parser.parse_args(argv)
    split = lambda text: [s.strip() for s in text.split(",") if s.strip()]  # noqa: E731
    ops, backends = split(args.ops) or None, split(args.backends) or None
    for op in ops or ():
        kernels.get_op(op)
    for name in backends or ():
        if not any(name in kernels.get_op(op).backends for op in ops or kernels.OPS):
            parser.error(f"--backends: no op has a backend {name!r}")

    if args.forget:
        validation.forget(args.device)
        print(f"forgot the verdicts for this device in {validation.cache_file()}")
        return
    if args.show:
        stored = validation.results(args.device)
        if not stored:
            print("nothing validated on this device with these versions")
        for name, entry in sorted(stored.items()):
            print(f"{name:<24} {'validated' if entry['passed'] else 'FAILED':<10} {entry['when']}  "
                  f"ran {entry['ran']}, skipped {entry['skipped']}, worst {entry['worst']}")
            for failure in entry.get("failures", []):
                print(f"    {failure}")
        return

    dtypes = tuple(getattr(torch, d) for d in split(args.dtypes))
    report = validation.validate(ops, backends, args.device, dtypes, store=not args.no_store,
                                 progress=lambda row: print(f"  {row.op}/{row.backend} {row.case} {row.dtype}", flush=True,
                                                            file=sys.stderr))
    print(report)
    if not args.no_store:
        print(f"verdicts stored in {validation.cache_file()}")
    if not report.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    cli.run(main)
