"""Benchmarks: `python tools/bench.py NAME [options]`; `python tools/bench.py --help` lists them.

Each benchmark lives in zoo/bench/NAME.py and exposes `add_arguments(parser)` and `run(args)`;
it prints tables of times and ratios measured in one run (ratios are what to compare: these
machines are noisy). Every benchmark first lets glibc's malloc keep freed memory for reuse
(zoo.bench.keep_freed_memory; --system-malloc leaves it alone), so that no tensor is timed being
page-faulted in.
"""

from __future__ import annotations

import importlib
import pkgutil

import zoo.bench
from zoo import cli


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    for info in sorted(pkgutil.iter_modules(zoo.bench.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"zoo.bench.{info.name}")
        p = sub.add_parser(info.name.replace("_", "-"), help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.add_argument("--system-malloc", action="store_true",
                       help="leave glibc's malloc as it is (by default freed blocks are kept for reuse, so that "
                            "tensors of 32 MiB and more are not page-faulted anew on every step)")
        p.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    print("allocator: " + ("system malloc (--system-malloc)" if args.system_malloc else zoo.bench.keep_freed_memory()))
    args.run(args)


if __name__ == "__main__":
    cli.run(main)
