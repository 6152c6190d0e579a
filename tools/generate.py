"""Sample from a causal LM and stream the tokens to the terminal as they are produced.

    python tools/generate.py --prompt "def "                              # default.gin, random weights
    python tools/generate.py --checkpoint runs/text_lm --prompt "The " --temperature 0.8 --top_p 0.9
    python tools/generate.py --gin_file=default.gin --checkpoint runs/x/checkpoints/step_00000500/model.safetensors \\
        --prompt "x = " --greedy --max_new_tokens 100 --stop_token 10
    python tools/generate.py --prompt_ids "1 2 3" --ids --max_new_tokens 20     # token ids in and out

The model comes from --gin_file/--gin_param; without --gin_file it comes from the run's config.gin
when --checkpoint points into a run folder (tools/train.py), else from default.gin. --checkpoint
is a run folder, a checkpoints folder, a step_* folder or a model.safetensors file; without it the
weights are random. --prompt text is encoded as UTF-8 bytes (the byte-level text LM task) and the
output decoded back; --ids prints token ids instead. With one prompt the continuation streams as
it is produced; with several they are generated as one batch and printed when done.
"""

from __future__ import annotations

import codecs
import sys
import time
from pathlib import Path

import torch
from torch import nn

from zoo import cli, gin_config
from zoo.cache import StackCache
from zoo.generate import generate
from zoo.train import checkpoint
from zoo.train.run_dir import CONFIG

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def run_config(path: Path) -> Path | None:
    """The config.gin of the run folder that `path` (a checkpoint file or folder) lies in, if any."""
    folder = path if path.is_dir() else path.parent
    for candidate in [folder, *folder.parents][:4]:  # run/, run/checkpoints/, run/checkpoints/step_*/
        if (candidate / CONFIG).is_file():
            return candidate / CONFIG
    return None


def load_weights(model: nn.Module, path: Path) -> Path:
    """Load a model.safetensors file, or the latest checkpoint under a folder, into `model` -> the file."""
    file = path if path.is_file() else checkpoint.resolve(path) / checkpoint.WEIGHTS
    weights = checkpoint.load_weights(file)
    checkpoint.check_compatible(model.state_dict(), weights, str(file))
    model.load_state_dict(weights)
    return file


class Printer:
    """Writes tokens to stdout as bytes decoded incrementally as UTF-8 (or as ids with `ids`)."""

    def __init__(self, ids: bool):
        self.ids = ids
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, tokens: list[int]) -> None:
        if self.ids:
            text = "".join(f"{t} " for t in tokens)
        else:
            text = "".join(self.decoder.decode(bytes([t])) if t < 256 else f"<{t}>" for t in tokens)
        sys.stdout.write(text)
        sys.stdout.flush()

    def end(self) -> None:
        sys.stdout.write(("" if self.ids else self.decoder.decode(b"", final=True)) + "\n")
        sys.stdout.flush()
        self.decoder.reset()


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    gin_config.add_gin_args(parser)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="run folder, checkpoint folder or model.safetensors (default: random weights)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text, UTF-8 bytes (repeatable)")
    parser.add_argument("--prompt_ids", action="append", default=[],
                        help="prompt as token ids separated by spaces or commas (repeatable)")
    parser.add_argument("--ids", action="store_true", help="print token ids instead of decoded bytes")
    parser.add_argument("--max_new_tokens", type=cli.positive_int, default=200)
    parser.add_argument("--temperature", type=cli.positive_float, default=1.0)
    parser.add_argument("--top_k", type=cli.positive_int, default=None)
    parser.add_argument("--top_p", type=cli.probability, default=None)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding")
    parser.add_argument("--stop_token", type=cli.nonnegative_int, action="append", default=[],
                        help="finish a row when it produces this token id (repeatable; 10 is a newline in bytes)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (and of the random weights)")
    parser.add_argument("--prefill_chunk", type=cli.positive_int, default=None, help="prefill the prompt in chunks of this size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--show_cache", action="store_true", help="print the cache's memory per layer")
    args = parser.parse_args(argv)

    config = run_config(args.checkpoint) if args.checkpoint is not None and not args.gin_file else None
    gin_config.parse([str(config)] if config else args.gin_file or ["default.gin"], args.gin_param)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = gin_config.build_model()
    if args.checkpoint is not None:
        print(f"weights: {load_weights(model, args.checkpoint)}" + (f" (config: {config})" if config else ""),
              file=sys.stderr)
    else:
        print("weights: random (no --checkpoint)", file=sys.stderr)
    model = model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()

    prompts = []
    for text in args.prompt_ids:
        try:
            prompts.append([int(t) for t in text.replace(",", " ").split()])
        except ValueError:
            parser.error(f"--prompt_ids {text!r}: token ids must be integers separated by spaces or commas")
    if args.prompt:
        if model.vocab_size < 256:
            parser.error(f"--prompt is encoded as bytes but the model's vocab_size is {model.vocab_size} < 256; "
                         "use --prompt_ids")
        prompts += [list(p.encode("utf-8")) for p in args.prompt]
    if not prompts:
        parser.error("give at least one --prompt or --prompt_ids")
    if args.show_cache:
        max_len = max(len(p) for p in prompts) + args.max_new_tokens - 1
        print(StackCache.allocate(model, len(prompts), max_len).describe(), file=sys.stderr)

    printer = Printer(args.ids)
    streaming = len(prompts) == 1
    if streaming:
        printer.write(prompts[0])
    start = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, stop_tokens=args.stop_token,
                   seed=args.seed, prefill_chunk=args.prefill_chunk,
                   stream=(lambda row, token: printer.write([token])) if streaming else None)
    seconds = time.perf_counter() - start
    if streaming:
        printer.end()
    else:
        for i, (prompt, new) in enumerate(zip(prompts, out)):
            print(f"--- sample {i} ---")
            printer.write(prompt + new)
            printer.end()
    total = sum(len(r) for r in out)
    print(f"{total} new tokens in {seconds:.2f} s ({total / seconds:.1f} tokens/s, prefill included)", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
