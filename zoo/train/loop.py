"""The training loop: one function, `train`, driven by a `TrainConfig` (bound from gin by tools/train.py).

    config = TrainConfig(steps=500, batch_size=32, eval_every=100)
    result = train(config, build_model, task, "runs/demo")

Per optimizer step, the global batch of `batch_size` examples is split into `grad_accum`
micro-batches on each of the `world_size` processes. The loss is the summed cross-entropy over the
scored positions divided by the number of scored positions in the whole global batch, so one
process with accumulation, several processes, or both, compute the same gradient.

Data order: epoch e visits the training split in a permutation seeded by (seed, e); the position
in that stream (examples consumed) is saved in checkpoints, with the optimizer, schedule and RNG
states, so `resume=True` continues bit-exactly.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from zoo.tasks.base import SPLITS, Task
from zoo.train import checkpoint, distributed
from zoo.train.evaluate import (PRECISIONS, autocast, check_model_fits_task, evaluate, forward_loss, scored_count,
                                to_device)
from zoo.train.optim import adamw, cosine_schedule
from zoo.train.run_dir import RunDir


@dataclass
class TrainConfig:
    """Everything about a run except the model and the task.

    steps: optimizer steps in total.
    batch_size: examples per optimizer step, over all processes and micro-batches.
    grad_accum: micro-batches per step on each process (batch_size % (grad_accum * world) == 0).
    grad_clip: clip the global gradient norm to this (None: no clipping).
    precision: "fp32", or "bf16" (autocast; weights and optimizer stay float32).
    eval_every: evaluate on the validation split every this many steps (0: only at the end).
    eval_examples: validation examples per evaluation during training (None: the whole split).
    eval_batch_size: examples per forward pass when evaluating (None: batch_size // grad_accum).
    final_splits: splits evaluated in full (up to final_eval_examples) at the end.
    final_eval_examples: cap for the final evaluations (None: whole splits).
    checkpoint_every: save every this many steps (0: only at the end).
    keep_checkpoints: how many of the newest checkpoints to keep.
    log_every: write a training record to metrics.jsonl every this many steps.
    seed: seeds the model's initialisation, the data order and every RNG.
    optimizer: factory(model) -> Optimizer (gin: @adamw).
    schedule: factory(optimizer, total_steps) -> LR scheduler (gin: @cosine_schedule).
    device: "auto", "cpu" or "cuda".
    strategy: "ddp" or "fsdp" (FSDP2 fully_shard) under torchrun.
    num_workers: DataLoader worker processes generating examples (0: in the training process).
    """

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    eval_every: int = 0
    eval_examples: int | None = 512
    eval_batch_size: int | None = None
    final_splits: tuple[str, ...] = ("validation", "test")
    final_eval_examples: int | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] = adamw
    schedule: Callable[..., torch.optim.lr_scheduler.LRScheduler] = cosine_schedule
    device: str = "auto"
    strategy: str = "ddp"
    num_workers: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every", "num_workers", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        self.final_splits = tuple(self.final_splits)
        if bad := [s for s in self.final_splits if s not in SPLITS]:
            raise ValueError(f"TrainConfig.final_splits must be among {SPLITS}, got {bad}")


class TrainStream:
    """The order in which training examples are visited: epoch e is a permutation of range(n)
    seeded by (seed, e). `indices(start, count)` is stream[start : start + count]."""

    def __init__(self, num_examples: int, seed: int):
        self.n, self.seed = num_examples, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._perm(i // self.n)[i % self.n]) for i in range(start, start + count)]


class StepBatches:
    """Batch sampler: the example indices of each (step, micro-batch) for this rank, from step
    `first` to `last`. Stream offset of a step: base_examples + (step - base_step) * batch_size."""

    def __init__(self, stream: TrainStream, first: int, last: int, base_step: int, base_examples: int,
                 batch_size: int, grad_accum: int, rank: int, world_size: int):
        self.stream, self.first, self.last = stream, first, last
        self.base_step, self.base_examples = base_step, base_examples
        self.batch_size, self.grad_accum, self.rank = batch_size, grad_accum, rank
        self.micro = batch_size // (grad_accum * world_size)

    def offset(self, step: int) -> int:
        """Examples consumed before `step`."""
        return self.base_examples + (step - self.base_step) * self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first, self.last):
            for m in range(self.grad_accum):
                start = self.offset(step) + (m * (self.batch_size // self.grad_accum)) + self.rank * self.micro
                yield self.stream.indices(start, self.micro)

    def __len__(self) -> int:
        return (self.last - self.first) * self.grad_accum


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(config: TrainConfig, build_model: Callable[[], nn.Module], task: Task, run_dir: str | Path, *,
          resume: bool = False, operative_config: Callable[[], str] | None = None) -> dict:
    """Train `build_model()` on `task`, writing the run folder (see zoo.train.run_dir).

    build_model is called after seeding, so the initialisation depends only on config.seed.
    operative_config, if given, is called once the model is built and its text saved as config.gin.
    Returns the final metrics (also written to final_metrics.json) plus "train_losses": the loss
    of every step this call ran (global mean over the batch).
    """
    env = distributed.setup(config.device)
    G, A, W = config.batch_size, config.grad_accum, env.world_size
    if G % (A * W):
        raise ValueError(f"TrainConfig.batch_size={G} must be divisible by grad_accum * world_size = {A} * {W}")
    run = RunDir(run_dir, enabled=env.is_main)

    seed_everything(config.seed)
    model = build_model().to(env.device)
    check_model_fits_task(model, task)
    wrapped = distributed.wrap(model, env, config.strategy)
    optimizer = config.optimizer(model)
    scheduler = config.schedule(optimizer, total_steps=config.steps)
    n_params = count_parameters(model)
    eval_batch = config.eval_batch_size or max(1, G // (A * W))

    start_step, base_examples = 0, 0
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}  # training steps since the last log record
    if resume:
        ckpt = checkpoint.latest(run.checkpoints)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run.checkpoints}")
        state = checkpoint.read_state(ckpt)
        checkpoint.load_model_weights(wrapped, ckpt)
        checkpoint.restore_optimizer(wrapped, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["schedule"])
        start_step, base_examples = state["step"], state["data"]["examples_seen"]
        window = state["log_window"]
        if state["data"]["seed"] != config.seed:
            raise ValueError(f"--resume: the checkpoint was trained with seed={state['data']['seed']}, "
                             f"the config says seed={config.seed}")
        if len(state["rng"]) == W:
            checkpoint.set_rng_state(state["rng"][env.rank])
        elif env.is_main:
            tqdm.write(f"resume: checkpoint has RNG states of {len(state['rng'])} processes, running on {W}; "
                       "their RNG states are not restored (weights, optimizer and data order are)")
        run.truncate_after(start_step)
        if env.is_main:
            tqdm.write(f"resumed from {ckpt} at step {start_step}")
    elif checkpoint.list_checkpoints(run.checkpoints):
        raise FileExistsError(f"{run.checkpoints} already holds checkpoints: pass --resume to continue that run, "
                              "or choose another run folder")
    if operative_config is not None:
        run.write_config(operative_config())

    train_split = task.split("train")
    sampler = StepBatches(TrainStream(len(train_split), config.seed), start_step, config.steps, start_step,
                          base_examples, G, A, env.rank, W)
    loader = DataLoader(train_split, batch_sampler=sampler, collate_fn=task.collate, num_workers=config.num_workers,
                        pin_memory=env.device.type == "cuda")
    batches = iter(loader)

    def save(step: int) -> None:
        weights, optim = checkpoint.gather(wrapped, optimizer)
        rng = distributed.all_gather_objects(checkpoint.rng_state())
        if env.is_main:
            state = {"step": step, "optimizer": optim, "schedule": scheduler.state_dict(), "rng": rng,
                     "data": {"examples_seen": sampler.offset(step), "seed": config.seed, "batch_size": G},
                     "log_window": window, "world_size": W,
                     "config": {k: v for k, v in asdict(config).items() if not callable(v)}}
            checkpoint.write(run.checkpoints, step, weights, state, keep=config.keep_checkpoints)
        distributed.barrier()

    def validate(step: int) -> dict:
        metrics = evaluate(eval_model, task, "validation", batch_size=eval_batch, max_examples=config.eval_examples,
                           precision=config.precision)
        run.log({"step": step, "split": "validation", **metrics})
        if env.is_main:
            tqdm.write(f"step {step}: validation " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    # FSDP runs forward passes through the sharded model; a DDP wrapper is only needed for backward
    eval_model = wrapped if config.strategy == "fsdp" else model
    losses: list[float] = []
    bar = tqdm(total=config.steps, initial=start_step, desc="train", disable=not env.is_main, dynamic_ncols=True,
               unit="step", mininterval=1.0 if sys.stderr.isatty() else 30.0)  # sparse updates in log files
    train_time, train_tokens = 0.0, 0
    start_wall = time.perf_counter()
    model.train()
    try:
        for step in range(start_step, config.steps):
            t0 = time.perf_counter()
            micro = [to_device(next(batches), env.device) for _ in range(A)]
            counts = torch.tensor([sum(scored_count(b, task.kind) for b in micro),
                                   sum(int(b["mask"].sum()) for b in micro)], dtype=torch.float64, device=env.device)
            scored, tokens = distributed.all_reduce_sum(counts).tolist()
            loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
            for m, batch in enumerate(micro):
                last = m == A - 1
                with _no_grad_sync(wrapped, sync=last), autocast(env.device, config.precision):
                    loss, _ = forward_loss(wrapped, batch, task.kind)
                (loss * (W / scored)).backward()
                loss_sum += loss.detach().double()
            if config.strategy == "fsdp":
                distributed.average_replicated_grads(model)
            grad_norm = (float(_full(nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)))
                         if config.grad_clip is not None else None)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = float(distributed.all_reduce_sum(loss_sum) / scored)
            losses.append(step_loss)
            dt = time.perf_counter() - t0
            train_time += dt
            train_tokens += int(tokens)
            window = {"loss": window["loss"] + step_loss, "steps": window["steps"] + 1,
                      "tokens": window["tokens"] + int(tokens), "time": window["time"] + dt}
            done = step + 1
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / dt:,.0f}", refresh=False)
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                run.log({"step": done, "split": "train", "loss": window["loss"] / window["steps"], "lr": lr,
                         "grad_norm": grad_norm, "tokens_per_s": window["tokens"] / window["time"],
                         "examples_seen": sampler.offset(done), "time": time.perf_counter() - start_wall})
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
            if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                validate(done)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done != config.steps:
                save(done)
    finally:
        bar.close()

    final: dict = {"step": config.steps, "parameters": n_params,
                   "train_loss": losses[-1] if losses else None,
                   "tokens_per_s": train_tokens / train_time if train_time else None,
                   "train_time_s": train_time}
    curve = validate(config.steps)  # the last point of the validation curve
    for split in config.final_splits:
        if split == "validation" and config.final_eval_examples == config.eval_examples:
            final[split] = curve
        else:
            final[split] = evaluate(eval_model, task, split, batch_size=eval_batch,
                                    max_examples=config.final_eval_examples, precision=config.precision)
    final["wall_time_s"] = time.perf_counter() - start_wall
    save(config.steps)
    run.write_final(final)
    plots = run.plot()
    if env.is_main:
        tqdm.write(f"run folder: {run.path}  (plots: {', '.join(str(p) for p in plots)})")
    return {**final, "train_losses": losses}


def _no_grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync / FSDP2 flag)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _full(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly distributed) DTensor."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
