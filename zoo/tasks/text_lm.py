"""Next-token language modelling on a text file or folder, byte-level by default.

The corpus (one file, or every file under a folder in sorted path order, joined by a newline) is
one token stream. It is cut into three contiguous ranges by `split_fractions` (train, validation,
test), and each range into windows of L + 1 tokens at stride L = seq_len: segment i of the range
starting at s has tokens stream[s + i L : s + i L + L] and targets shifted by one, so every token
of a range is predicted once. Nothing crosses a range boundary, so the splits share no token.

Without `path` the corpus is the English documentation that ships with Python
(`pydoc_data.topics`, about 0.47 MB), so the task works without any download.
With `tokenizer` (a path to a Hugging Face `tokenizers` JSON file; needs the optional package
`tokenizers`) every document is encoded with it instead of as UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from zoo.tasks.base import SPLITS, Task, check_positive_int, check_split


def default_corpus() -> list[str]:
    """The pydoc topics, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def read_documents(path: str | Path) -> list[str]:
    """The text of a file, or of every file under a folder (sorted, hidden paths skipped)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    else:
        raise FileNotFoundError(f"path {str(path)!r} is neither a file nor a folder")
    if not files:
        raise ValueError(f"path {str(path)!r} contains no files")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


class TextLM(Task):
    """Args:
        path: text file or folder; None for the embedded pydoc corpus.
        seq_len: tokens per segment.
        tokenizer: None for bytes (vocab 256), or a `tokenizers` JSON file.
        split_fractions: shares of the stream for train / validation / test.
    """

    name = "text_lm"

    def __init__(
        self,
        path: str | None = None,
        seq_len: int = 256,
        tokenizer: str | None = None,
        split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
    ):
        self.seq_len = check_positive_int("seq_len", seq_len)
        if len(split_fractions) != 3 or any(f <= 0 for f in split_fractions):
            raise ValueError(f"split_fractions must be three positive shares (train, validation, test); got {tuple(split_fractions)}")
        documents = default_corpus() if path is None else read_documents(path)
        if tokenizer is None:
            self.vocab_size = 256
            data = "\n".join(documents).encode("utf-8")
            self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        else:
            try:
                from tokenizers import Tokenizer
            except ImportError as e:
                raise ImportError("tokenizer= needs the optional package `tokenizers` (pip install tokenizers)") from e
            tok = Tokenizer.from_file(str(tokenizer))
            self.vocab_size = tok.get_vocab_size()
            self.data = torch.tensor([i for enc in tok.encode_batch(documents) for i in enc.ids], dtype=torch.long)
        self.kind = "lm"
        self.pad_id = 0
        total = sum(split_fractions)
        bounds = [0]
        for f in split_fractions:
            bounds.append(bounds[-1] + f / total * len(self.data))
        bounds = [round(b) for b in bounds]
        self.ranges = {name: (bounds[k], bounds[k + 1]) for k, name in enumerate(SPLITS)}
        for name, (start, end) in self.ranges.items():
            if (end - start - 1) // seq_len < 1:
                raise ValueError(
                    f"the {name} split has {end - start} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                    "lower seq_len, change split_fractions or use more text"
                )

    def num_examples(self, split: str) -> int:
        start, end = self.ranges[check_split(split)]
        return (end - start - 1) // self.seq_len

    def example(self, split: str, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.num_examples(split):
            raise IndexError(f"index {index} out of range for the {split} split of {self.num_examples(split)} segments")
        s = self.ranges[split][0] + index * self.seq_len
        window = self.data[s : s + self.seq_len + 1]
        return {"tokens": window[:-1].clone(), "targets": window[1:].clone()}
