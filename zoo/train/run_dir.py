"""The run folder: everything one training run leaves behind.

    runs/<name>/
      config.gin            operative gin config (every bound value, to rebuild model and task)
      metrics.jsonl         one JSON object per line: {"step", "split": "train"|"validation", ...}
      final_metrics.json    last evaluation of each split, parameter count, throughput, wall time
      checkpoints/          see zoo.train.checkpoint
      plots/loss.png        training and validation loss against step
      plots/metrics.png     every validation metric against step

One folder holds one run: a new run refuses a folder that holds any of these (`existing_artefacts`)
unless it resumes it, or the old run is first moved aside whole (`set_aside`). While a run trains
into a folder it holds an exclusive lock on the folder (flock, where the OS has it), so a second
process cannot write into it at the same time.
Only rank 0 writes: the other ranks get a RunDir with `enabled=False` that ignores writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from zoo.plots import pyplot, save_figure
from zoo.train.files import atomic_write

try:
    import fcntl
except ImportError:  # no flock (Windows): runs are not locked
    fcntl = None

CONFIG = "config.gin"
METRICS = "metrics.jsonl"
FINAL = "final_metrics.json"
ARTEFACTS = (CONFIG, METRICS, FINAL, "checkpoints", "plots")


class RunDir:
    """Writes the files of one run under `path`."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._lock: int | None = None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def existing_artefacts(self) -> list[str]:
        """The run artefacts already in the folder (an empty checkpoints/ or plots/ folder counts too)."""
        return [name for name in ARTEFACTS if (self.path / name).exists()]

    def set_aside(self) -> Path:
        """Move the whole folder to a fresh sibling `<name>.set-aside-<date>-<time>[-k]`; returns it."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.set-aside-{stamp}")
        k = 1
        while target.exists():
            k += 1
            target = self.path.with_name(f"{self.path.name}.set-aside-{stamp}-{k}")
        os.rename(self.path, target)
        return target

    def lock(self) -> None:
        """Create the folder and hold an exclusive lock on it until `unlock` (or the process ends).
        The lock is on the folder itself: no file is added to it."""
        if not self.enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.path} is in use: another process is training into it; wait for it to "
                               "finish or choose another run folder") from None
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def write_config(self, text: str, *, keep_previous_as: str | None = None) -> None:
        """Write config.gin. With `keep_previous_as`, an existing config.gin with other text is first
        kept under that name (a resumed run with changed bindings keeps the old one)."""
        if not self.enabled:
            return
        path = self.path / CONFIG
        if keep_previous_as and path.is_file() and path.read_text() != text:
            previous = self.path / keep_previous_as
            if not previous.exists():
                atomic_write(previous, path.read_bytes())
        atomic_write(path, text)

    def log(self, record: dict) -> None:
        """Append one metrics record (a JSON line)."""
        if self.enabled:
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate(self, keep) -> tuple[int, bool]:
        """Keep only the records for which `keep(record)` is true (a resumed run re-logs the others
        exactly), dropping a torn last line. Returns (records dropped, whether a torn line was)."""
        if not (self.enabled and (self.path / METRICS).exists()):
            return 0, False
        records, torn = _read_records(self.path / METRICS)
        kept = [r for r in records if keep(r)]
        if len(kept) != len(records) or torn:
            atomic_write(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept), torn is not None

    def write_final(self, metrics: dict) -> None:
        if self.enabled:
            atomic_write(self.path / FINAL, json.dumps(metrics, indent=2) + "\n")

    def plot(self) -> list[Path]:
        """Write the PNG plots of the logged curves; returns their paths."""
        if not self.enabled:
            return []
        return plot_curves(read_metrics(self.path), self.plots)


def _read_records(path: Path) -> tuple[list[dict], str | None]:
    """The records of a metrics.jsonl and its torn last line, if any (a kill in the middle of an
    append leaves a last line without its newline). Any other unreadable line is an error."""
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    torn = None
    if lines and lines[-1].strip():  # no newline at the end: the last append did not finish
        torn = lines.pop()
        try:
            record = json.loads(torn)
            if isinstance(record, dict) and "step" in record:
                lines.append(torn)  # complete JSON, only the newline is missing
                torn = None
        except ValueError:
            pass
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: not a JSON record ({e}): {line[:80]!r}; remove or repair "
                             "that line") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}, line {number}: not a metrics record (a JSON object with a 'step'): {line[:80]!r}")
        records.append(record)
    return records, torn


def read_metrics(run: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order (empty if none were logged). A torn last
    line (the process was killed while appending it) is left out; any other bad line is an error
    naming the file and the line."""
    path = Path(run) / METRICS
    if not path.exists():
        return []
    return _read_records(path)[0]


def read_final(run: str | Path) -> dict:
    path = Path(run) / FINAL
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: did the run in {run} finish?")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def plot_curves(records: list[dict], out: str | Path) -> list[Path]:
    """loss.png (train and validation loss) and metrics.png (one panel per validation metric)."""
    plt = pyplot()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "validation"]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_figure(fig, out / "loss.png"))

    names = [k for k in (val[-1] if val else {}) if k not in ("step", "split", "loss", "time")
             and isinstance(val[-1][k], (int, float))]
    if names:
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            points = [(r["step"], r[name]) for r in val if name in r]
            ax.plot(*zip(*points), "o-", ms=3)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle("validation")
        written.append(save_figure(fig, out / "metrics.png"))
    return written
