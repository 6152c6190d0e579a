"""Simulated failures inside a training run: an optimizer whose step raises (a killed process) or
writes NaN into a weight (a diverging update). Each factory is a `TrainConfig.optimizer`."""

from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn

from zoo.train.optim import adamw


class Crash(Exception):
    """The simulated kill."""


def _adamw_with(hook: Callable[[int, nn.Module], None], after_update: bool) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """adamw(lr=1e-2) that calls hook(n, model) before (or after) its n-th step (1-based, in this process)."""

    def factory(model: nn.Module) -> torch.optim.Optimizer:
        opt, calls = adamw(model, lr=1e-2), [0]
        real = opt.step

        def step(self, *args, **kwargs):
            calls[0] += 1
            if not after_update:
                hook(calls[0], model)
            out = real(*args, **kwargs)
            if after_update:
                hook(calls[0], model)
            return out

        opt.step = types.MethodType(step, opt)
        return opt

    return factory


def crash_at(step: int) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """adamw whose `step`-th step raises Crash before updating: the process dies mid-run."""

    def hook(n: int, model: nn.Module) -> None:
        if n == step:
            raise Crash(f"simulated kill in step {step}")

    return _adamw_with(hook, after_update=False)


def poison_weights_after(step: int) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """adamw that writes NaN into a weight right after its `step`-th update (a diverging update)."""

    def hook(n: int, model: nn.Module) -> None:
        if n == step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    return _adamw_with(hook, after_update=True)
