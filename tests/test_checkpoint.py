"""Checkpoints: safetensors round trip with tied weights, clear mismatch errors, atomic writes
(a torn write leaves the previous checkpoint loadable), RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from zoo.train import checkpoint


class Tied(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.norm(self.emb(x)))


def _trained(seed: int = 0) -> tuple[Tied, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.arange(5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(directory, step, model, opt, **state):
    weights, optim = checkpoint.gather(model, opt)
    return checkpoint.write(directory, step, weights, {"step": step, "optimizer": optim, **state})


def test_round_trip_with_tied_weights(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, 3, model, opt)
    assert path.name == "step_00000003" and checkpoint.latest(tmp_path) == path
    loaded = checkpoint.load_weights(path / checkpoint.WEIGHTS)
    assert set(loaded) == set(model.state_dict())
    fresh, fresh_opt = _trained(seed=1)
    checkpoint.load_model_weights(fresh, path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.head.weight is fresh.emb.weight  # still tied after loading
    checkpoint.restore_optimizer(fresh, fresh_opt, checkpoint.read_state(path)["optimizer"])
    for (a, b) in zip(opt.state.values(), fresh_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_mismatch_names_keys_and_shapes(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, 1, model, opt)

    class Other(Tied):
        def __init__(self):
            super().__init__(vocab=13)
            self.extra = nn.Linear(2, 2)
            del self.norm
            self.norm = nn.Identity()

    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        checkpoint.load_model_weights(Other(), path)
    msg = str(err.value)
    assert "emb.weight: checkpoint (11, 6) vs model (13, 6)" in msg
    assert "missing in checkpoint (2): extra.bias, extra.weight" in msg
    assert "not in model (2): norm.bias, norm.weight" in msg


def test_torn_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained()
    good = _save(tmp_path, 1, model, opt, data={"examples_seen": 8})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.arange(5)).sum().backward()
    opt.step()

    real_write = checkpoint.write_synced

    def torn(path, data):  # the process dies half-way through writing the state file
        if path.name == checkpoint.STATE:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise KeyboardInterrupt("simulated crash mid-write")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "write_synced", torn)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, opt, data={"examples_seen": 16})
    monkeypatch.setattr(checkpoint, "write_synced", real_write)

    assert any(p.name.startswith(".tmp_") for p in tmp_path.iterdir())  # the torn files exist...
    assert checkpoint.latest(tmp_path) == good  # ...but are never picked up
    assert checkpoint.resolve(tmp_path) == good
    assert checkpoint.read_state(good)["data"] == {"examples_seen": 8}
    fresh = Tied()
    checkpoint.load_model_weights(fresh, good)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())

    # a torn pointer update: the new checkpoint folder is in place but `latest` was never replaced
    monkeypatch.setattr(checkpoint, "_write_latest", lambda directory, name: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        _save(tmp_path, 3, model, opt)
    monkeypatch.undo()
    assert (tmp_path / checkpoint.LATEST).read_text().strip() == good.name
    assert checkpoint.latest(tmp_path) == good

    third = _save(tmp_path, 4, model, opt)  # the next save cleans the leftovers up
    assert checkpoint.latest(tmp_path) == third
    assert not any(p.name.startswith(".tmp_") for p in tmp_path.iterdir())


def test_keep_prunes_old_checkpoints(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3, 4):
        weights, optim = checkpoint.gather(model, opt)
        checkpoint.write(tmp_path, step, weights, {"step": step}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_resolve_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        checkpoint.resolve(tmp_path)


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
