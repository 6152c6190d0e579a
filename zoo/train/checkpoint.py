"""Checkpoints: weights in safetensors, everything else (optimizer, schedule, RNG, data position)
in a torch file, written atomically.

Layout of a run's checkpoint folder:

    checkpoints/
      step_00000500/model.safetensors   weights (tied tensors stored once, aliases in the metadata)
      step_00000500/state.pt            {"step", "optimizer", "schedule", "rng", "data", ...}
      latest                            text: the name of the newest complete checkpoint

A checkpoint is first written to a hidden temporary folder (files fsynced), which is then renamed
into place with `os.replace`, and only then is `latest` replaced (again via a temporary file). A
crash at any point leaves the previous checkpoint and `latest` intact; leftover temporary folders
are ignored and removed by the next save.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

WEIGHTS = "model.safetensors"
STATE = "state.pt"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model (missing, unexpected or differently shaped)."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------- weights (safetensors)

def weights_to_bytes(state_dict: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize a state dict to safetensors bytes. Tensors sharing storage (tied embedding and
    head) are stored once; the other names are recorded in metadata["aliases"] = {alias: stored}."""
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            stored[name] = t.contiguous()
    meta = dict(metadata or {})
    meta["aliases"] = json.dumps(aliases)
    return st_save(stored, metadata=meta)


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file written by `weights_to_bytes`; aliases become entries again."""
    path = Path(path)
    data = path.read_bytes()
    tensors = st_load(data)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for alias, name in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[name]
    return tensors


def check_compatible(model_state: dict[str, Tensor], loaded: dict[str, Tensor], source: str) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(model_state) - set(loaded))
    unexpected = sorted(set(loaded) - set(model_state))
    shapes = sorted(f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(model_state[k].shape)}"
                    for k in set(model_state) & set(loaded) if tuple(loaded[k].shape) != tuple(model_state[k].shape))
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not match the model:"]
        if missing:
            lines.append(f"  missing in checkpoint ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  not in model ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatch ({len(shapes)}): " + "; ".join(shapes))
        lines.append("  (was it trained with a different gin config? load it with the run's own config.gin)")
        raise CheckpointMismatchError("\n".join(lines))


# ----------------------------------------------------------------------------- atomic files

def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_file(tmp, text.encode())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write(directory: str | Path, step: int, weights: dict[str, Tensor], state: dict, keep: int | None = None,
          metadata: dict[str, str] | None = None) -> Path:
    """Atomically write checkpoint `step` under `directory`, point `latest` at it, and keep only
    the newest `keep` checkpoints (all when None). Returns the checkpoint's folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp_*"):  # leftovers of an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / step_name(step)
    tmp = directory / f".tmp_{step_name(step)}_{os.getpid()}"
    tmp.mkdir()
    _write_file(tmp / WEIGHTS, weights_to_bytes(weights, metadata))
    buf = io.BytesIO()
    torch.save(state, buf)
    _write_file(tmp / STATE, buf.getvalue())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(directory)
    _atomic_write_text(directory / LATEST, final.name + "\n")
    if keep is not None:
        for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoint folders (both files present), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / WEIGHTS).is_file() and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest(directory: str | Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if the pointer is missing/stale."""
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        target = directory / pointer.read_text().strip()
        if (target / WEIGHTS).is_file() and (target / STATE).is_file():
            return target
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from: a checkpoint folder, a checkpoints folder, or a run folder."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        found = latest(candidate)
        if found is not None:
            return found
    raise FileNotFoundError(f"no checkpoint found at {path} (looked for {WEIGHTS}, a '{LATEST}' pointer, "
                            f"and step_* folders in it and in {path / 'checkpoints'})")


def read_state(checkpoint: str | Path) -> dict:
    """The non-weight state of a checkpoint folder (optimizer, schedule, RNG, data position)."""
    return torch.load(Path(checkpoint) / STATE, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- model <-> checkpoint

def load_model_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint's weights into `model` (plain, DDP-wrapped or FSDP2-sharded), raising
    CheckpointMismatchError that names every mismatched tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from zoo.train.distributed import unwrap

    path = Path(checkpoint) / WEIGHTS
    loaded = load_weights(path)
    check_compatible(unwrap(model).state_dict(), loaded, str(path))
    set_model_state_dict(unwrap(model), loaded, options=StateDictOptions(full_state_dict=True, strict=True))


def gather(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict[str, Tensor], dict | None]:
    """Full (unsharded, CPU) model and optimizer state dicts. Collective under FSDP: call on every
    rank. Optimizer state is keyed by parameter name, so it survives re-wrapping."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from zoo.train.distributed import unwrap

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(unwrap(model), options=options)
    optim = get_optimizer_state_dict(unwrap(model), optimizer, options=options) if optimizer is not None else None
    return weights, optim


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from zoo.train.distributed import unwrap

    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    """This process's random-number generator states (Python, NumPy, torch CPU and CUDA)."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states returned by `rng_state`."""
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
