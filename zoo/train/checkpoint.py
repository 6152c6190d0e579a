"""Checkpoints: weights in safetensors, everything else (optimizer, schedule, RNG, data position)
in a torch file, a manifest with their content hashes, all written atomically.

Layout of a run's checkpoint folder:

    checkpoints/
      step_00000500/model.safetensors   weights (tied tensors stored once, aliases in the metadata)
      step_00000500/state.pt            {"step", "optimizer", "schedule", "rng", "data", ...}
      step_00000500/manifest.json       {"step", "finite", "files": {name: {"bytes", "sha256"}}}
      latest                            text: the name of the newest complete checkpoint

A checkpoint is first written to a hidden temporary folder (files fsynced), which is then renamed
into place with `os.replace`, and only then is `latest` replaced (again via a temporary file). A
crash at any point leaves the previous checkpoint and `latest` intact; leftover temporary folders
are ignored and removed by the next save.

What is never lost: `write` refuses to write a step at or below an existing checkpoint's (it never
replaces a checkpoint), and pruning (`keep`) removes only checkpoints older than the one just
written, never the newest one whose weights are all finite. Loading verifies each file against
the sha256 in its manifest, so a damaged file is reported (naming it) instead of loading wrong
weights; a file that cannot be parsed is reported the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from zoo.train.files import atomic_write, fsync_dir, write_synced

WEIGHTS = "model.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model (missing, unexpected or differently shaped)."""


class CheckpointCorruptError(ValueError):
    """A checkpoint file is damaged, truncated, altered since it was saved, or not a checkpoint at all."""


class CheckpointExistsError(FileExistsError):
    """Writing this step would replace a checkpoint at the same or a later step."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(folder: str | Path) -> int | None:
    """The step of a `step_*` checkpoint folder (None for any other name)."""
    m = _STEP_DIR.match(Path(folder).name)
    return int(m.group(1)) if m else None


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


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors header: 8-byte little-endian length, then JSON."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file written by `weights_to_bytes`; aliases become entries again.
    Raises CheckpointCorruptError naming the file when it is damaged or fails its manifest hash."""
    path = Path(path)
    data = _read_verified(path)
    try:
        tensors = st_load(data)
        aliases = json.loads(_safetensors_metadata(data).get("aliases", "{}"))
        for alias, name in aliases.items():
            tensors[alias] = tensors[name]
    except Exception as e:
        raise CheckpointCorruptError(f"{path} is not a readable safetensors file ({len(data)} bytes; "
                                     f"{type(e).__name__}: {e}): it is damaged or truncated") from None
    return tensors


def mismatch_lines(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], against: str = "model",
                   unexpected: Iterable[str] = (), name: Callable[[str], str] = str) -> list[str]:
    """One line each for the tensors missing from `found`, those not in `expected` (plus `unexpected`,
    named already) and those of another shape; [] when the two match. `name` renames keys for the
    message, `against` names what `expected` came from."""
    missing = sorted(name(k) for k in expected if k not in found)
    unexpected = sorted([*(name(k) for k in found if k not in expected), *unexpected])
    shapes = sorted(f"{name(k)}: checkpoint {tuple(found[k].shape)} vs {against} {tuple(expected[k].shape)}"
                    for k in found if k in expected and tuple(found[k].shape) != tuple(expected[k].shape))
    lines = []
    if missing:
        lines.append(f"  missing in checkpoint ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  not in {against} ({len(unexpected)}): {', '.join(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatch ({len(shapes)}): " + "; ".join(shapes))
    return lines


def check_compatible(model_state: dict[str, Tensor], loaded: dict[str, Tensor], source: str) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and mis-shaped tensor."""
    lines = mismatch_lines(model_state, loaded)
    if lines:
        raise CheckpointMismatchError("\n".join([f"checkpoint {source} does not match the model:", *lines,
                                                 "  (was it trained with a different gin config? load it with the "
                                                 "run's own config.gin)"]))


# ----------------------------------------------------------------------------- manifest (integrity)

def _digest(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_manifest(checkpoint: str | Path) -> dict | None:
    """A checkpoint folder's manifest (None for checkpoints written before manifests existed)."""
    path = Path(checkpoint) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' entry")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{path} is damaged ({e}); the checkpoint's files cannot be verified") from None
    return manifest


def _read_verified(path: Path) -> bytes:
    """The bytes of a checkpoint file, checked against the size and sha256 in its folder's manifest."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    data = path.read_bytes()
    manifest = read_manifest(path.parent)
    expected = manifest["files"].get(path.name) if manifest else None
    if expected is not None:
        if len(data) != expected["bytes"]:
            raise CheckpointCorruptError(f"{path} has {len(data)} bytes but was saved with {expected['bytes']} "
                                         f"(truncated or altered since it was saved; see {path.parent / MANIFEST})")
        found = hashlib.sha256(data).hexdigest()
        if found != expected["sha256"]:
            raise CheckpointCorruptError(f"{path} fails its integrity check: sha256 {found[:16]}... but it was saved "
                                         f"as {expected['sha256'][:16]}... (altered or damaged since it was saved; "
                                         f"see {path.parent / MANIFEST})")
    return data


def is_finite(checkpoint: str | Path) -> bool:
    """Whether a checkpoint's weights were all finite when saved (True when it has no manifest)."""
    manifest = read_manifest(checkpoint)
    return True if manifest is None else bool(manifest.get("finite", True))


def all_finite(weights: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())


# ----------------------------------------------------------------------------- writing

def write(directory: str | Path, step: int, weights: dict[str, Tensor], state: dict, keep: int | None = None,
          metadata: dict[str, str] | None = None) -> Path:
    """Atomically write checkpoint `step` under `directory`, point `latest` at it, and keep the
    newest `keep` checkpoints (all when None) plus the newest one with finite weights.

    Raises CheckpointExistsError, touching nothing, if a checkpoint at `step` or later exists.
    Returns the checkpoint's folder."""
    directory = Path(directory)
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None; got keep={keep}")
    final = directory / step_name(step)
    existing = list_checkpoints(directory)
    later = [p for p in existing if step_of(p) >= step]
    if later or final.exists():
        raise CheckpointExistsError(f"refusing to write {final}: {(later or [final])[-1]} exists already, and a "
                                    "checkpoint is never replaced by one of the same or an earlier step")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp_*"):  # leftovers of an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory / f".tmp_{step_name(step)}_{os.getpid()}"
    tmp.mkdir()
    weight_bytes = weights_to_bytes(weights, metadata)
    buf = io.BytesIO()
    torch.save(state, buf)
    state_bytes = buf.getvalue()
    write_synced(tmp / WEIGHTS, weight_bytes)
    write_synced(tmp / STATE, state_bytes)
    manifest = {"step": step, "finite": all_finite(weights),
                "files": {WEIGHTS: _digest(weight_bytes), STATE: _digest(state_bytes)}}
    write_synced(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(directory)
    _write_latest(directory, final.name)
    if keep is not None:
        _prune(directory, keep, final)
    return final


def _write_latest(directory: Path, name: str) -> None:
    atomic_write(directory / LATEST, name + "\n")


def _prune(directory: Path, keep: int, written: Path) -> None:
    """Remove checkpoints older than the newest `keep`, except the newest one with finite weights."""
    found = list_checkpoints(directory)
    finite = [p for p in found if is_finite(p)]
    protected = {written, *finite[-1:]}
    for old in found[:-keep]:
        if old not in protected and step_of(old) < step_of(written):
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoint folders (both files present), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step_of(p), p) for p in directory.iterdir()
             if step_of(p) is not None and (p / WEIGHTS).is_file() and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest(directory: str | Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if the pointer is missing/stale."""
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        target = directory / name
        if step_of(name) is not None and (target / WEIGHTS).is_file() and (target / STATE).is_file():
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
    """The non-weight state of a checkpoint folder (optimizer, schedule, RNG, data position).

    Loaded with torch's safe loader (weights_only=True): tensors, numbers, strings and containers
    only. Raises CheckpointCorruptError naming the file when it is damaged or holds anything else."""
    path = Path(checkpoint) / STATE
    data = _read_verified(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointCorruptError(f"{path} holds objects a checkpoint never contains, so the safe loader "
                                     f"refused it ({_refusal(e)}); it is damaged or was not written by this "
                                     "library") from None
    except Exception as e:
        reason = str(e).split(". ")[0] or type(e).__name__
        raise CheckpointCorruptError(f"{path} is not a readable torch file ({len(data)} bytes; {reason}): it is "
                                     "damaged or truncated") from None
    if not isinstance(state, dict):
        raise CheckpointCorruptError(f"{path} holds a {type(state).__name__}, not a checkpoint state dict")
    return state


def _refusal(error: Exception) -> str:
    """What torch's safe loader objected to, without its advice on how to load the file anyway."""
    found = re.search(r"(unsupported GLOBAL [\w.]+|Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)", str(error),
                      re.IGNORECASE)
    return found.group(1) if found else "content that is not tensors, numbers, strings or containers"


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
