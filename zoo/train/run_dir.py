"""The run folder: everything one training run leaves behind.

    runs/<name>/
      config.gin            operative gin config (every bound value, to rebuild model and task)
      metrics.jsonl         one JSON object per line: {"step", "split": "train"|"validation", ...}
      final_metrics.json    last evaluation of each split, parameter count, throughput, wall time
      checkpoints/          see zoo.train.checkpoint
      plots/loss.png        training and validation loss against step
      plots/metrics.png     every validation metric against step

Only rank 0 writes: the other ranks get a RunDir with `enabled=False` that ignores writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from zoo.plots import pyplot, save_figure

CONFIG = "config.gin"
METRICS = "metrics.jsonl"
FINAL = "final_metrics.json"


class RunDir:
    """Writes the files of one run under `path`."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def write_config(self, text: str) -> None:
        if self.enabled:
            _atomic_write(self.path / CONFIG, text)

    def log(self, record: dict) -> None:
        """Append one metrics record (a JSON line)."""
        if self.enabled:
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records logged after `step` (a resumed run re-logs them exactly)."""
        if self.enabled and (self.path / METRICS).exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= step]
            _atomic_write(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in kept))

    def write_final(self, metrics: dict) -> None:
        if self.enabled:
            _atomic_write(self.path / FINAL, json.dumps(metrics, indent=2) + "\n")

    def plot(self) -> list[Path]:
        """Write the PNG plots of the logged curves; returns their paths."""
        if not self.enabled:
            return []
        return plot_curves(read_metrics(self.path), self.plots)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(run: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order (empty if none were logged)."""
    path = Path(run) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_final(run: str | Path) -> dict:
    path = Path(run) / FINAL
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: did the run in {run} finish?")
    return json.loads(path.read_text())


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
