"""What every command-line tool in tools/ shares: its parser, its error handling, its argument types.

    from zoo import cli

    def main(argv=None):
        parser = cli.parser(__doc__)
        parser.add_argument("--batch_size", type=cli.positive_int, default=None)
        args = parser.parse_args(argv)
        ...

    if __name__ == "__main__":
        cli.run(main)

A user error (a bad value, a missing file, a refused run folder) ends the tool with one line on
stderr, `<tool>: error: <what is wrong>`, and exit status 1; bad command-line syntax exits with 2
(argparse). `--debug` (or the environment variable ZOO_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence


def parser(doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser with the tool's docstring as its help text and the shared --debug flag."""
    p = argparse.ArgumentParser(description=inspect.cleandoc(doc or ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback instead of one line (also: ZOO_DEBUG=1)")
    return p


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)` (argv None: the command line); turn an exception into one line on stderr
    and exit status 1, unless --debug or ZOO_DEBUG=1 asks for the traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ZOO_DEBUG", "") not in ("", "0")
    prog = Path(inspect.getfile(main)).name
    try:
        main([a for a in args if a != "--debug"])  # every tool's parser accepts it, but not after a subcommand
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # every failure is reported; --debug shows where it came from
        if debug:
            raise
        print(f"{prog}: error: {message(e)}", file=sys.stderr)
        raise SystemExit(1) from None


def message(error: BaseException) -> str:
    """The error's message on one line (prefixed with its type unless that adds nothing)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = "".join(line + ("" if i == len(lines) - 1 else " " if line.endswith(":") else "; ")
                   for i, line in enumerate(lines))
    name = type(error).__name__
    if not text:
        return name
    if isinstance(error, (ValueError, TypeError, FileNotFoundError, FileExistsError)):
        return text
    return f"{name}: {text}"


# ----------------------------------------------------------------------------- argument types

def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
