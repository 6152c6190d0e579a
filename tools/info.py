"""What this installation offers: registered mixers (with pattern symbols) and blocks, and every
op's backends with their availability (and the reason when unavailable).

    python tools/info.py                                   # registry and backends
    python tools/info.py --gin_file=default.gin            # ... plus the model summary
    python tools/info.py --gin_file=default.gin --gin_file=backends/reference.gin \\
        --gin_param="layer1/Attention.window = 64"
"""

from __future__ import annotations

import kernels
from zoo import cli, gin_config
from zoo.registry import REGISTRY, underlying_class
from zoo.summary import summarize


def _origin(factory) -> str:
    base = underlying_class(factory)
    text = f"{base.__module__}.{base.__qualname__}"
    keywords = getattr(factory, "keywords", None)
    if keywords:
        text += "(" + ", ".join(f"{k}={v!r}" for k, v in keywords.items()) + ")"
    return text


def registry_text() -> str:
    width = max(len(name) for name in [*REGISTRY.mixers, *REGISTRY.blocks])
    lines = ["Mixers (symbol for layout patterns):"]
    for entry in REGISTRY.mixers.values():
        lines.append(f"  {entry.symbol or '-'}  {entry.name:<{width}} {_origin(entry.source)}")
    lines.append("Blocks:")
    for entry in REGISTRY.blocks.values():
        lines.append(f"     {entry.name:<{width}} {_origin(entry.source)}")
    return "\n".join(lines)


def backends_text() -> str:
    lines = ["Ops and backends (priority order; dispatch takes the first that can run the inputs):"]
    for name, op in kernels.OPS.items():
        pinned = op.pinned()
        lines.append(f"  {name}" + (f"  (pinned to {pinned!r})" if pinned else ""))
        for b in sorted(op.backends.values(), key=lambda b: -b.priority):
            why = b.unavailable_reason()
            lines.append(f"    {b.name:<12} priority {b.priority:>3}  " + ("available" if why is None else f"unavailable: {why}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    gin_config.add_gin_args(parser)
    parser.add_argument("--seq_len", type=cli.positive_int, default=8, help="length of the summary's probe forward")
    args = parser.parse_args(argv)
    print(registry_text())
    print()
    print(backends_text())
    if args.gin_file or args.gin_param:
        gin_config.parse_args(args)
        print()
        print(summarize(gin_config.build_model(), seq_len=args.seq_len))


if __name__ == "__main__":
    cli.run(main)
