"""Cost of the NaN policy (kernels.nan_policy): one layer with the policy on against the same layer with it off.

Each mixer runs in the paper's GatedBlock under automatic backend selection. Three calls are timed
with the policy on and off, alternating inside every repeat so both see the same machine load:
    fwd      a forward pass of (B, T, D) under torch.no_grad
    fwd+bwd  a training step: forward and backward of y.sum(), parameter gradients included
    decode   one decoding step (B, 1, D) after a prefill of T tokens (the ops then see the whole
             cache, or the recurrent state), best step of --steps
Times are the best of --repeats; the overhead is on / off - 1 (noise on a busy machine is a few
percent either way). Defaults: B=4, T=512, D=256, 4 heads, float32, 2 threads.

    python tools/bench.py nan-policy
    python tools/bench.py nan-policy --mixers attention mamba2 --T 2048
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from blocks.gated_block import GatedBlock
from kernels import nan_policy
from zoo.bench import DTYPES, sync
from zoo.registry import REGISTRY

MIXERS = ("attention", "sessa", "mamba2", "gla", "gated_deltanet")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), help="registered mixer names")
    parser.add_argument("--T", type=int, nargs="+", default=[512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="decoding steps timed per repeat")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")


def build(name: str, dim: int, heads: int) -> GatedBlock:
    source = REGISTRY.mixer(name).source
    kwargs = {"head_dim": dim * 2 // heads} if name == "mamba2" else {"num_heads": heads}
    return GatedBlock(dim, lambda d: source(d, **kwargs))


def _timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _calls(block: GatedBlock, x: torch.Tensor, steps: int) -> dict:
    """{what: a function that runs it and returns its seconds}."""
    def forward():
        with torch.no_grad():
            block(x)

    def train():
        block.zero_grad(set_to_none=True)
        block(x).sum().backward()

    def decode() -> float:
        state = block.allocate_state(x.shape[0], x.shape[1] + steps, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            block(x, state=state)
            return min(_timed(lambda: block(x[:, i:i + 1], state=state), x.device) for i in range(steps))

    return {"fwd": lambda: _timed(forward, x.device), "fwd+bwd": lambda: _timed(train, x.device), "decode": decode}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"nan-policy: GatedBlock(mixer), automatic backends, B={args.batch} D={args.dim} heads={args.heads} "
          f"{args.dtype} on {args.device}, {args.threads} threads, best of {args.repeats} (decode: best of "
          f"{args.steps} steps after a prefill of T); policy on and off alternate; load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print(f"{'mixer':<16} {'T':>5} {'call':<8} {'on ms':>9} {'off ms':>9} {'overhead':>9}")
    for T in args.T:
        for name in args.mixers:
            torch.manual_seed(0)
            block = build(name, args.dim, args.heads).to(device=device, dtype=dtype)
            x = torch.randn(args.batch, T, args.dim, device=device, dtype=dtype)
            for what, call in _calls(block, x, args.steps).items():
                best = {True: float("inf"), False: float("inf")}
                for on in (True, False):  # warm-up
                    with nan_policy.enabled(on):
                        call()
                for _ in range(args.repeats):
                    for on in (True, False):
                        with nan_policy.enabled(on):
                            best[on] = min(best[on], call())
                print(f"{name:<16} {T:>5} {what:<8} {1e3 * best[True]:>9.2f} {1e3 * best[False]:>9.2f} "
                      f"{best[True] / best[False] - 1:>+8.1%}", flush=True)
