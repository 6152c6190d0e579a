"""Demo: build the default Sessa/attention hybrid from configs/default.gin, print its summary and
time one forward + backward pass on random tokens.

    python tools/demo.py
    python tools/demo.py --gin_file=default.gin --gin_file=backends/reference.gin --seq_len=256
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
import torch.nn.functional as F

from zoo import gin_config
from zoo.summary import summarize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=inspect.cleandoc(__doc__ or ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    gin_config.add_gin_args(parser)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gin_config.parse_args(args, default_files=["default.gin"])
    model = gin_config.build_model()
    print(summarize(model))
    print()

    tokens = torch.randint(model.vocab_size, (args.batch_size, args.seq_len + 1))
    start = time.perf_counter()
    logits = model(tokens[:, :-1])  # next-token prediction on random bytes: loss ~ ln(vocab)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    forward_s = time.perf_counter() - start
    loss.backward()
    total_s = time.perf_counter() - start
    print(f"batch {args.batch_size} x {args.seq_len} tokens: loss {loss.item():.4f} "
          f"(ln V = {torch.log(torch.tensor(float(model.vocab_size))).item():.4f}); "
          f"forward {forward_s * 1e3:.1f} ms, forward + backward {total_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
