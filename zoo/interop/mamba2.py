"""Mamba-2 language-model checkpoints of mamba_ssm and Hugging Face transformers, in and out of the zoo.

    model = load_mamba2("ckpt/")                        # either format, told apart by its config.json
    model = load_hf_mamba2("ckpt/")                     # Mamba2ForCausalLM: config.json + *.safetensors
    model = load_mamba_ssm("ckpt/")                     # MambaLMHeadModel: config.json + pytorch_model.bin
    model = load_mamba_ssm(state_dict, config={...})    # or its state dict and config (a dict or MambaConfig)
    save_hf_mamba2(model, "out_hf/");  save_mamba_ssm(model, "out_ssm/")
    spec = Mamba2LM.from_model(model);  print(spec.gin_config())   # the same model as a gin config

This module reads and writes the files; the model description and config translation are in
zoo.interop.mamba2_spec and zoo.interop.mamba2_config, the parameter names in zoo.interop.mamba2_weights.
Every upstream option is either mapped onto a zoo argument, accepted because it only affects
initialisation or speed, or refused with an error naming it (docs/interop.md has the table).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from zoo.interop.mamba2_config import HF, SSM, UnsupportedOptionError, detect_format
from zoo.interop.mamba2_spec import Mamba2LM
from zoo.interop.mamba2_weights import from_upstream_state_dict, to_upstream_state_dict
from zoo.models import CausalLM
from zoo.train.files import atomic_write

__all__ = ["Mamba2LM", "UnsupportedOptionError", "detect_format", "load_hf_mamba2", "load_mamba2", "load_mamba_ssm",
           "save_hf_mamba2", "save_mamba_ssm"]


def _load_into(spec: Mamba2LM, state_dict: Mapping[str, Tensor], source: str,
               dtype: torch.dtype | None, device: torch.device | str | None) -> CausalLM:
    with torch.device("meta"):
        model = spec.build()
    weights = from_upstream_state_dict(state_dict, model, source)
    model.load_state_dict(weights, strict=True, assign=True)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a checkpoint folder holds config.json and its weights)")
    with open(path) as f:
        return json.load(f)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors


def _read_weights(folder: Path) -> tuple[dict[str, Tensor], str]:
    """All tensors of a checkpoint folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                               ("pytorch_model.bin.index.json", lambda p: torch.load(p, map_location="cpu", weights_only=True))):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(_read_json(index)["weight_map"].values()))
            tensors = {}
            for name in files:
                tensors.update(reader(folder / name))
            return tensors, str(index)
    if (folder / "model.safetensors").is_file():
        return _read_safetensors(folder / "model.safetensors"), str(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    raise FileNotFoundError(f"{folder} holds no weights: expected model.safetensors, model.safetensors.index.json, "
                            "pytorch_model.bin or pytorch_model.bin.index.json")


def load_hf_mamba2(folder: str | Path, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> CausalLM:
    """A Hugging Face Mamba2ForCausalLM folder (config.json + safetensors or pytorch_model.bin) as a
    zoo CausalLM, in eval mode. dtype/device: convert (None keeps each tensor's stored dtype)."""
    folder = Path(folder)
    spec = Mamba2LM.from_hf_config(_read_json(folder / "config.json"))
    weights, source = _read_weights(folder)
    return _load_into(spec, weights, source, dtype, device)


def load_mamba_ssm(checkpoint: str | Path | Mapping[str, Tensor], config: Any = None,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> CausalLM:
    """A mamba_ssm MambaLMHeadModel as a zoo CausalLM, in eval mode: a folder (config.json +
    pytorch_model.bin, as its save_pretrained writes), or a state dict with `config` (a dict or a
    MambaConfig). dtype/device: convert (None keeps each tensor's stored dtype)."""
    if isinstance(checkpoint, Mapping):
        if config is None:
            raise ValueError("load_mamba_ssm(state_dict, config=...): a state dict needs its MambaConfig (dict)")
        weights, source = checkpoint, "mamba_ssm state dict"
    else:
        folder = Path(checkpoint)
        config = _read_json(folder / "config.json") if config is None else config
        weights, source = _read_weights(folder)
    return _load_into(Mamba2LM.from_mamba_ssm_config(config), weights, source, dtype, device)


def load_mamba2(folder: str | Path, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> CausalLM:
    """A Mamba-2 checkpoint folder in either format (told apart by its config.json) as a zoo CausalLM."""
    fmt = detect_format(_read_json(Path(folder) / "config.json"))
    return load_hf_mamba2(folder, dtype, device) if fmt == HF else load_mamba_ssm(folder, dtype=dtype, device=device)


def _prepare_folder(folder: str | Path, overwrite: bool) -> Path:
    folder = Path(folder)
    if (folder / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a config.json; pass overwrite=True to replace that checkpoint")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_hf_mamba2(model: CausalLM, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a zoo Mamba-2 model as a Hugging Face Mamba2ForCausalLM folder (config.json +
    model.safetensors), loadable with transformers' from_pretrained. Refuses (naming it) anything
    Hugging Face's Mamba2 cannot represent."""
    spec = Mamba2LM.from_model(model)
    config = spec.hf_config()
    config["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    weights = {k: v.detach().contiguous().cpu() for k, v in to_upstream_state_dict(model, HF).items()}
    folder = _prepare_folder(folder, overwrite)
    atomic_write(folder / "model.safetensors", safetensors_bytes(weights, metadata={"format": "pt"}))
    atomic_write(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


def save_mamba_ssm(model: CausalLM, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a zoo Mamba-2 model as mamba_ssm's save_pretrained does (config.json +
    pytorch_model.bin), loadable with MambaLMHeadModel.from_pretrained. Refuses (naming it) anything
    mamba_ssm cannot represent."""
    config = Mamba2LM.from_model(model).mamba_ssm_config()
    weights = {k: v.detach().cpu() for k, v in to_upstream_state_dict(model, SSM).items()}
    folder = _prepare_folder(folder, overwrite)
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    atomic_write(folder / "pytorch_model.bin", buffer.getvalue())
    atomic_write(folder / "config.json", json.dumps(config, indent=4) + "\n")
    return folder
