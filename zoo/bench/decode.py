"""Decoding throughput (tokens/s): GatedBlock(Sessa) vs GatedBlock(Attention) at the same width.

Each block prefills a random prompt into a fresh state, then decodes single tokens; the table gives
prefill time, decode tokens/s (batch x steps / time) and the ratio to attention, best of --repeats
runs (the models alternate, so both see the same machine load). Defaults: B=4, D=256, 4 heads,
prefill 512, 256 steps, float32, 2 threads, under torch.inference_mode.

    python tools/bench.py decode
    python tools/bench.py decode --backends feedback_solve=reference,attention=sdpa
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from blocks.attention import Attention
from blocks.gated_block import GatedBlock
from blocks.sessa import Sessa
from kernels import record_choices, use_backends

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="", help="op=backend pins for both models, e.g. feedback_solve=reference")
    parser.add_argument("--device", default="cpu")


def _pins(spec: str) -> dict[str, str]:
    pins = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, sep, name = item.partition("=")
        if not sep:
            raise ValueError(f"--backends entry {item!r} must look like op=backend")
        pins[op.strip()] = name.strip()
    return pins


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(block: GatedBlock, prompt: torch.Tensor, steps: torch.Tensor) -> tuple[float, float]:
    """prompt (B, P, D), steps (N, B, 1, D) -> (prefill seconds, decode seconds) on a fresh state."""
    device = prompt.device
    state = block.allocate_state(prompt.shape[0], prompt.shape[1] + steps.shape[0])
    _sync(device)
    start = time.perf_counter()
    block(prompt, state=state)
    _sync(device)
    prefilled = time.perf_counter()
    for x in steps:
        block(x, state=state)
    _sync(device)
    return prefilled - start, time.perf_counter() - prefilled


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    D, H, B = args.dim, args.heads, args.batch
    models = {
        "attention": GatedBlock(D, partial(Attention, num_heads=H, num_kv_heads=args.kv_heads)),
        "sessa": GatedBlock(D, partial(Sessa, num_heads=H, num_kv_heads=args.kv_heads)),
    }
    for m in models.values():
        m.to(device=device, dtype=dtype).eval()
    prompt = torch.randn(B, args.prefill, D, device=device, dtype=dtype)
    steps = torch.randn(args.steps, B, 1, D, device=device, dtype=dtype)

    best = {name: (float("inf"), float("inf")) for name in models}
    with torch.inference_mode(), use_backends(**_pins(args.backends)), record_choices() as choices:
        for name, m in models.items():  # warm-up (lazy init, backend choice logging)
            time_decode(m, prompt[:, :8], steps[:4])
        for _ in range(args.repeats):
            for name, m in models.items():
                pre, dec = time_decode(m, prompt, steps)
                best[name] = (min(best[name][0], pre), min(best[name][1], dec))

    print(f"decode: B={B} D={D} heads={H} kv_heads={args.kv_heads or H} prefill={args.prefill} "
          f"steps={args.steps} {args.dtype} threads={args.threads} device={args.device} "
          f"(best of {args.repeats})")
    print(f"backends used: {', '.join(f'{op}={b}' for op, b in sorted(set(choices)))}")
    base = B * args.steps / best["attention"][1]
    print(f"{'model':<10} {'prefill ms':>11} {'ms/step':>9} {'tokens/s':>10} {'vs attention':>13} {'cache/token':>12}")
    for name, m in models.items():
        pre, dec = best[name]
        tps = B * args.steps / dec
        print(f"{name:<10} {1e3 * pre:>11.1f} {1e3 * dec / args.steps:>9.3f} {tps:>10.0f} {tps / base:>12.2f}x "
              f"{m.mixer.state_numbers_per_token():>12}")
