"""Decoding throughput (tokens/s) of every registered mixer's GatedBlock vs attention's, same width.

Each block prefills a random prompt into a fresh state, then decodes single tokens; the table gives
prefill time, decode tokens/s (batch x steps / time), the ratio to attention and the decoding state
per sequence: numbers per token for a cache that grows, else the constant state's numbers. The
models alternate over --repeats runs; a prefill counts its fastest run and the decode time sums,
step by step, the fastest run of each step (robust to a busy machine preempting single steps).
Models: attention, then every mixer in the registry (--models picks some), each with --heads heads
where it takes num_heads and its other defaults (zoo.bench.layer.build). Defaults: B=4, D=256, 4
heads, prefill 512, 256 steps, float32, 2 threads, under torch.inference_mode.

    python tools/bench.py decode
    python tools/bench.py decode --models sessa gla --backends feedback_solve=reference,attention=sdpa
"""

from __future__ import annotations

import argparse
import inspect
import time
from functools import partial

import torch

from blocks.gated_block import GatedBlock
from kernels import record_choices, use_backends
from kernels.dispatch import parse_pins
from zoo.bench import DTYPES, sync
from zoo.registry import REGISTRY


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
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"mixers to time next to attention (default: every registered one: {', '.join(REGISTRY.mixers)})")


def build(name: str, dim: int, heads: int, kv_heads: int | None) -> GatedBlock:
    """GatedBlock(registered mixer `name`), --heads / --kv-heads where the mixer takes them."""
    source = REGISTRY.mixer(name).source
    params = inspect.signature(source).parameters
    kwargs = {k: v for k, v in (("num_heads", heads), ("num_kv_heads", kv_heads)) if k in params and v is not None}
    return GatedBlock(dim, partial(source, **kwargs))


def state_size(block: GatedBlock, max_len: int) -> str:
    """Numbers per token of a growing cache, else the numbers of the constant state (one sequence
    of up to `max_len` tokens: a sliding window's ring holds min(window - 1, max_len) of them)."""
    per_token = block.mixer.state_numbers_per_token()
    if per_token is not None:
        return f"{per_token} / token"
    state = block.allocate_state(1, max_len)
    return f"{sum(t.numel() for t in vars(state).values() if torch.is_tensor(t) and t.is_floating_point())} const"


def time_decode(block: GatedBlock, prompt: torch.Tensor, steps: torch.Tensor) -> tuple[float, list[float]]:
    """prompt (B, P, D), steps (N, B, 1, D) -> (prefill seconds, seconds of each step) on a fresh state."""
    device = prompt.device
    state = block.allocate_state(prompt.shape[0], prompt.shape[1] + steps.shape[0])
    sync(device)
    start = time.perf_counter()
    block(prompt, state=state)
    sync(device)
    prefill = time.perf_counter() - start
    times = []
    for x in steps:
        start = time.perf_counter()
        block(x, state=state)
        sync(device)
        times.append(time.perf_counter() - start)
    return prefill, times


def run(args: argparse.Namespace) -> dict[str, dict]:
    """Time every selected model; prints the table and returns {model: {"prefill_s", "decode_s",
    "tokens_per_s", "vs_attention", "state"}} (decode_s: the summed fastest step times)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    D, H, B = args.dim, args.heads, args.batch
    names = list(REGISTRY.mixers) if args.models is None else args.models
    unknown = [n for n in names if n not in REGISTRY.mixers]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; registered: {', '.join(REGISTRY.mixers)}")
    names = ["attention"] + [n for n in names if n != "attention"]
    models = {name: build(name, D, H, args.kv_heads) for name in names}
    for name in list(models):  # a mixer without a decoding state (allowed: blocks.mixer.Mixer) is reported, not timed
        try:
            models[name].allocate_state(1, 1)
        except NotImplementedError as e:
            print(f"skipped {name}: {e}")
            del models[name]
    for m in models.values():
        m.to(device=device, dtype=dtype).eval()
    prompt = torch.randn(B, args.prefill, D, device=device, dtype=dtype)
    steps = torch.randn(args.steps, B, 1, D, device=device, dtype=dtype)

    prefill = {name: float("inf") for name in models}
    step_times = {name: [float("inf")] * args.steps for name in models}
    with torch.inference_mode(), use_backends(**parse_pins(args.backends, "--backends")), record_choices() as choices:
        for name, m in models.items():  # warm-up (lazy init, backend choice logging)
            time_decode(m, prompt[:, :8], steps[:4])
        for _ in range(args.repeats):
            for name, m in models.items():
                pre, times = time_decode(m, prompt, steps)
                prefill[name] = min(prefill[name], pre)
                step_times[name] = [min(a, b) for a, b in zip(step_times[name], times)]
    decode = {name: sum(times) for name, times in step_times.items()}

    print(f"decode: B={B} D={D} heads={H} kv_heads={args.kv_heads or H} prefill={args.prefill} "
          f"steps={args.steps} {args.dtype} threads={args.threads} device={args.device} "
          f"(each step: fastest of {args.repeats} runs)")
    used: dict[str, set[str]] = {}
    for op, backend in choices:
        used.setdefault(op, set()).add(backend)
    print("backends used: " + "; ".join(f"{op}: {', '.join(sorted(b))}" for op, b in sorted(used.items())))
    base = B * args.steps / decode["attention"]
    results = {}
    width = max(len(n) for n in models)
    print(f"{'model':<{width}} {'prefill ms':>11} {'ms/step':>9} {'tokens/s':>10} {'vs attention':>13} {'state':>16}")
    rows = ["| model | prefill ms | ms / step | tokens/s | vs attention | decoding state per sequence |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, m in models.items():
        tps = B * args.steps / decode[name]
        size = state_size(m, args.prefill + args.steps)
        print(f"{name:<{width}} {1e3 * prefill[name]:>11.1f} {1e3 * decode[name] / args.steps:>9.3f} {tps:>10.0f} "
              f"{tps / base:>12.2f}x {size:>16}")
        rows.append(f"| {name} | {1e3 * prefill[name]:.1f} | {1e3 * decode[name] / args.steps:.3f} | {tps:.0f} | "
                    f"{tps / base:.2f}x | {size} |")
        results[name] = dict(prefill_s=prefill[name], decode_s=decode[name], tokens_per_s=tps, vs_attention=tps / base,
                             state=size)
    print("\n" + "\n".join(rows))
    return results
