"""What this installation offers: registered mixers (with pattern symbols) and blocks, and every
op's backends on this device: availability, whether our own kernels are validated here
(`python tools/validate.py`), and which backend dispatch picks for a typical input and why the
others were not picked.

    python tools/info.py                                   # registry and backends
    python tools/info.py --gin_file=default.gin            # ... plus the model summary
    python tools/info.py --gin_file=default.gin --gin_file=backends/reference.gin \\
        --gin_param="layer1/Attention.window = 64"
"""

from __future__ import annotations

import torch

import kernels
from kernels import validation
from kernels.dispatch import device_key
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


def backends_text(device: torch.device | None = None) -> str:
    device = validation._device(device)
    stored = validation.results(device)
    lines = [f"Ops and backends on {device_key(device)}, priority order. For a typical input of each op "
             f"(bfloat16, its first validation case) dispatch picks the first backend that can run it:"]
    for name, op in kernels.OPS.items():
        pinned = op.pinned()
        sample = None
        if validation.CASES.get(name):
            case = validation.CASES[name][0]
            sample = (case.name, *case.make(torch.bfloat16, device))
        picked = None
        if sample is not None:
            try:
                picked = op.select(*sample[1], **sample[2]).name
            except kernels.BackendError:
                picked = None
        head = f"  {name}" + (f"  (pinned to {pinned!r})" if pinned else "")
        if sample is not None:
            head += f"  [typical input {sample[0]}: {'picks ' + repr(picked) if picked else 'no backend can run it'}]"
        lines.append(head)
        for b in sorted(op.backends.values(), key=lambda b: -b.priority):
            why = b.unavailable_reason()
            trust = ""
            if b.needs_validation:
                entry = stored.get(f"{name}/{b.name}")
                trust = ("validated here " + entry["when"] if entry and entry["passed"] else
                         "FAILED validation here " + entry["when"] if entry else "not validated here")
                trust = f"  [{trust}]"
            if why is not None:
                state = f"unavailable: {why}"
            elif sample is None:
                state = "available"
            elif b.name == picked:
                state = "picked"
            else:
                state = f"not picked: {b.auto_reason(*sample[1], **sample[2]) or 'a higher-priority backend runs it'}"
            lines.append(f"    {b.name:<12} priority {b.priority:>3}{trust}  {state}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    gin_config.add_gin_args(parser)
    parser.add_argument("--seq_len", type=cli.positive_int, default=8, help="length of the summary's probe forward")
    parser.add_argument("--device", default=None, help="device for the backend table (default: current CUDA, else cpu)")
    args = parser.parse_args(argv)
    print(registry_text())
    print()
    print(backends_text(args.device))
    if args.gin_file or args.gin_param:
        gin_config.parse_args(args)
        print()
        print(summarize(gin_config.build_model(), seq_len=args.seq_len))


if __name__ == "__main__":
    cli.run(main)
