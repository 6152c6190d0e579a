"""Parameter names and layouts of Mamba-2 language models: zoo <-> Hugging Face / mamba_ssm state dicts.

The mixer's names are the upstream ones (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj); around it

    zoo                          Hugging Face                    mamba_ssm
    embed.weight                 backbone.embeddings.weight      backbone.embedding.weight
    stack.layers.i.norm1.*       backbone.layers.i.norm.*        backbone.layers.i.norm.*
    stack.layers.i.mixer.*       backbone.layers.i.mixer.*       backbone.layers.i.mixer.*
    stack.layers.i.norm2.*       -                               backbone.layers.i.norm2.*
    stack.layers.i.mlp.w_gate_up -                               backbone.layers.i.mlp.fc1 (halves swapped)
    stack.layers.i.mlp.w_down    -                               backbone.layers.i.mlp.fc2
    norm.*                       backbone.norm_f.*               backbone.norm_f.*
    head.weight (untied only)    lm_head.weight                  lm_head.weight
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from zoo.interop.mamba2_config import FORMAT_NAMES, HF, SSM
from zoo.models import CausalLM
from zoo.train.checkpoint import mismatch_lines

_LAYER = re.compile(r"^(?:stack|backbone)\.layers\.(\d+)\.(.*)$")
_ZOO_TO_UP_BLOCK = {"norm1.": "norm.", "norm2.": "norm2.", "mixer.": "mixer.", "mlp.w_gate_up.": "mlp.fc1.",
                    "mlp.w_down.": "mlp.fc2."}
_UP_TO_ZOO_BLOCK = {v: k for k, v in _ZOO_TO_UP_BLOCK.items()}


def _embedding_key(fmt: str) -> str:
    return "backbone.embeddings.weight" if fmt == HF else "backbone.embedding.weight"


def _zoo_to_upstream_key(key: str, fmt: str) -> str:
    if key == "embed.weight":
        return _embedding_key(fmt)
    if key.startswith("norm."):
        return "backbone.norm_f." + key[len("norm."):]
    if key == "head.weight":
        return "lm_head.weight"
    m = _LAYER.match(key)
    if m:
        for zoo, up in _ZOO_TO_UP_BLOCK.items():
            if m.group(2).startswith(zoo):
                return f"backbone.layers.{m.group(1)}.{up}{m.group(2)[len(zoo):]}"
    raise KeyError(f"no {FORMAT_NAMES[fmt]} name for zoo parameter {key!r}")


def _upstream_to_zoo_key(key: str) -> str | None:
    """The zoo name of an upstream parameter (None: not one the zoo knows; reported as unexpected)."""
    if key in ("backbone.embeddings.weight", "backbone.embedding.weight"):
        return "embed.weight"
    if key.startswith("backbone.norm_f."):
        return "norm." + key[len("backbone.norm_f."):]
    if key == "lm_head.weight":
        return "head.weight"
    m = _LAYER.match(key)
    if m and key.startswith("backbone."):
        for up, zoo in _UP_TO_ZOO_BLOCK.items():
            if m.group(2).startswith(up):
                return f"stack.layers.{m.group(1)}.{zoo}{m.group(2)[len(up):]}"
    return None


def _swap_halves(weight: Tensor) -> Tensor:
    """mamba_ssm's fc1 rows are [value; gate], the zoo SwiGLU's [gate; value] (and back)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_upstream_state_dict(model: CausalLM, fmt: str) -> dict[str, Tensor]:
    """The zoo model's weights under the upstream names of `fmt` ("hf" or "mamba_ssm"). A tied head
    is left out for Hugging Face (it re-ties on load) and included for mamba_ssm (its state dict has it)."""
    out = {}
    for key, value in model.state_dict().items():
        up = _zoo_to_upstream_key(key, fmt)
        out[up] = _swap_halves(value) if ".mlp.fc1." in up else value
    if model.head is None and fmt == SSM:
        out["lm_head.weight"] = out[_embedding_key(fmt)]
    return out


def from_upstream_state_dict(state_dict: Mapping[str, Tensor], model: CausalLM, source: str) -> dict[str, Tensor]:
    """An upstream state dict -> the zoo model's names, checked against the model: every missing,
    unexpected or mis-shaped tensor is named (upstream names) in one error."""
    expected = model.state_dict()
    out, unexpected = {}, []
    tied_head = None
    for key, value in state_dict.items():
        zoo = _upstream_to_zoo_key(key)
        if zoo == "head.weight" and model.head is None:
            tied_head = value  # tied: must equal the embedding
            continue
        if zoo is None or zoo not in expected:
            unexpected.append(key)
            continue
        out[zoo] = _swap_halves(value) if ".mlp.w_gate_up." in zoo else value
    fmt = HF if "backbone.embeddings.weight" in state_dict else SSM
    lines = mismatch_lines(expected, out, "config", unexpected, name=lambda k: _zoo_to_upstream_key(k, fmt))
    if lines:
        raise ValueError("\n".join([f"{source} does not match its config:", *lines]))
    if tied_head is not None and not torch.equal(tied_head.to(out["embed.weight"].dtype), out["embed.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from the embedding but the config ties them "
                         "(tie_word_embeddings / tie_embeddings = true)")
    return out
