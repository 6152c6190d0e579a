"""The training loop: one function, `train`, driven by a `TrainConfig` (bound from gin by tools/train.py).

    config = TrainConfig(steps=500, batch_size=32, eval_every=100)
    result = train(config, build_model, task, "runs/demo")

Per optimizer step, the global batch of `batch_size` examples is split into `grad_accum`
micro-batches on each of the `world_size` processes. The loss is the summed cross-entropy over the
scored positions divided by the number of scored positions in the whole global batch, so one
process with accumulation, several processes, or both, compute the same gradient.

Data order: epoch e visits the training split in a permutation seeded by (seed, e); the position
in that stream (examples consumed) is saved in checkpoints, with the optimizer, schedule and RNG
states, so `resume=True` continues bit-exactly. Resumes, re-runs into a used folder and what is
never lost: zoo.train.resume.

A step whose loss or gradient norm is not finite stops the run (NonFiniteError naming the step)
before its update is applied, or with `on_nonfinite="skip"` is skipped and counted; a checkpoint
is never written with non-finite weights.
"""

from __future__ import annotations

import contextlib
import math
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
from zoo.train.resume import Plan, claim_folder, on_main, prepare, restore, trim_metrics
from zoo.train.run_dir import RunDir, read_metrics

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss, gradient norm or weights (the message names the step)."""


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
    on_nonfinite: a step with a non-finite loss or gradient norm: "stop" the run with NonFiniteError
        (before that update is applied), or "skip" the update and count it ("skipped_steps" in the log).
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
    on_nonfinite: str = "stop"

    def __post_init__(self):
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every", "num_workers", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("eval_examples", "eval_batch_size", "final_eval_examples"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1 or None, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.grad_clip is not None and (not isinstance(self.grad_clip, (int, float)) or isinstance(self.grad_clip, bool)
                                           or not 0 < self.grad_clip < math.inf):
            raise ValueError(f"TrainConfig.grad_clip must be a finite number > 0 or None, got {self.grad_clip!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"TrainConfig.on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}")
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
          resume: bool = False, set_aside: bool = False, operative_config: Callable[[], str] | None = None) -> dict:
    """Train `build_model()` on `task`, writing the run folder (see zoo.train.run_dir).

    build_model is called after seeding, so the initialisation depends only on config.seed.
    operative_config, if given, is called once the model is built and its text saved as config.gin.
    resume: continue from the latest checkpoint (a run that already finished is left as it is).
    set_aside: if the folder holds another run, move it whole to a sibling folder first (without
    it, and without resume, such a folder is refused).
    Returns the final metrics (also written to final_metrics.json) plus "train_losses": the loss
    of every step this call ran (global mean over the batch).
    """
    env = distributed.setup(config.device)
    G, A, W = config.batch_size, config.grad_accum, env.world_size
    if G % (A * W):
        raise ValueError(f"TrainConfig.batch_size={G} must be divisible by grad_accum * world_size = {A} * {W}")
    run = RunDir(run_dir, enabled=env.is_main)
    try:
        on_main(env, lambda: claim_folder(run, resume=resume, set_aside=set_aside))
        plan = prepare(run, config, resume=resume)
        if plan.finished is not None:
            if env.is_main:
                tqdm.write(f"the run in {run.path} already finished at step {plan.start_step} (TrainConfig.steps = "
                           f"{config.steps}): nothing to do, nothing was changed. To train it longer, resume with a "
                           "larger TrainConfig.steps")
            return {**plan.finished, "train_losses": []}
        if resume:
            on_main(env, lambda: trim_metrics(run, plan))
        return _train(config, build_model, task, run, plan, env, operative_config)
    finally:
        run.unlock()


def _train(config: TrainConfig, build_model: Callable[[], nn.Module], task: Task, run: RunDir, plan: Plan,
           env: distributed.Dist, operative_config: Callable[[], str] | None) -> dict:
    G, A, W = config.batch_size, config.grad_accum, env.world_size
    seed_everything(config.seed)
    model = build_model().to(env.device)
    check_model_fits_task(model, task)
    wrapped = distributed.wrap(model, env, config.strategy)
    optimizer = config.optimizer(model)
    scheduler = config.schedule(optimizer, total_steps=config.steps)
    n_params = count_parameters(model)
    eval_batch = config.eval_batch_size or max(1, G // (A * W))

    start_step, base_examples, skipped = plan.start_step, 0, 0
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0, "skipped": 0}  # steps since the last log record
    if plan.state is not None:
        restore(plan, wrapped, optimizer, scheduler, config, env)
        base_examples = plan.state["data"]["examples_seen"]
        window.update(plan.state["log_window"])
        skipped = plan.state.get("skipped_steps", 0)
    if operative_config is not None:
        previous = f"config.{checkpoint.step_name(start_step)}.gin" if plan.state is not None else None
        run.write_config(operative_config(), keep_previous_as=previous)

    train_split = task.split("train")
    sampler = StepBatches(TrainStream(len(train_split), config.seed), start_step, config.steps, start_step,
                          base_examples, G, A, env.rank, W)
    loader = DataLoader(train_split, batch_sampler=sampler, collate_fn=task.collate, num_workers=config.num_workers,
                        pin_memory=env.device.type == "cuda")
    batches = iter(loader)

    def save(step: int) -> None:
        weights, optim = checkpoint.gather(wrapped, optimizer)
        flag = torch.tensor(0.0 if checkpoint.all_finite(weights) else 1.0, device=env.device)
        if float(distributed.all_reduce_sum(flag)):
            raise NonFiniteError(f"step {step}: the weights are not finite after this step's update (its loss and "
                                 f"gradient norm were finite); no checkpoint was written. {_newest(run)}")
        rng = distributed.all_gather_objects(checkpoint.rng_state())
        if env.is_main:
            state = {"step": step, "optimizer": optim, "schedule": scheduler.state_dict(), "rng": rng,
                     "data": {"examples_seen": sampler.offset(step), "seed": config.seed, "batch_size": G},
                     "log_window": window, "world_size": W, "skipped_steps": skipped,
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
            done = step + 1  # the step being taken, as logs and checkpoints number it
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
            # without clipping, an infinite bound measures the norm and leaves the gradients as they are
            clip = config.grad_clip if config.grad_clip is not None else math.inf
            grad_norm = float(_full(nn.utils.clip_grad_norm_(model.parameters(), clip)))
            step_loss = float(distributed.all_reduce_sum(loss_sum) / scored)
            lr = scheduler.get_last_lr()[0]
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if not finite and config.on_nonfinite == "stop":
                raise NonFiniteError(f"step {done}: the loss is {step_loss:.4g} and the gradient norm {grad_norm:.4g}; "
                                     f"the run stopped before applying this update. {_newest(run)} Lower adamw.lr, "
                                     "clip gradients (TrainConfig.grad_clip), or set TrainConfig.on_nonfinite = 'skip' "
                                     "to skip such steps")
            if finite:
                optimizer.step()
                losses.append(step_loss)
            else:
                skipped += 1
                if env.is_main:
                    tqdm.write(f"step {done}: loss {step_loss:.4g}, gradient norm {grad_norm:.4g}: update skipped "
                               f"(TrainConfig.on_nonfinite = 'skip'; {skipped} skipped so far)")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            train_time += dt
            train_tokens += int(tokens)
            window = {"loss": window["loss"] + (step_loss if finite else 0.0), "steps": window["steps"] + finite,
                      "tokens": window["tokens"] + int(tokens), "time": window["time"] + dt,
                      "skipped": window.get("skipped", 0) + (not finite)}
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / dt:,.0f}", refresh=False)
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                record = {"step": done, "split": "train",
                          "loss": window["loss"] / window["steps"] if window["steps"] else None, "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_s": window["tokens"] / window["time"],
                          "examples_seen": sampler.offset(done), "time": time.perf_counter() - start_wall}
                if config.on_nonfinite == "skip":
                    record["skipped_steps"] = window["skipped"]
                run.log(record)
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0, "skipped": 0}
            if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                validate(done)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done != config.steps:
                save(done)
        if not plan.finishing:
            save(config.steps)  # before the final evaluation: a kill during it loses no training
    finally:
        bar.close()

    last_logged = [r["loss"] for r in read_metrics(run.path) if r.get("split") == "train"] if env.is_main else []
    final: dict = {"step": config.steps, "parameters": n_params,
                   "train_loss": losses[-1] if losses else (last_logged[-1] if last_logged else None),
                   "tokens_per_s": train_tokens / train_time if train_time else None,
                   "train_time_s": train_time}
    if config.on_nonfinite == "skip" or skipped:
        final["skipped_steps"] = skipped
    curve = validate(config.steps)  # the last point of the validation curve
    for split in config.final_splits:
        if split == "validation" and config.final_eval_examples == config.eval_examples:
            final[split] = curve
        else:
            final[split] = evaluate(eval_model, task, split, batch_size=eval_batch,
                                    max_examples=config.final_eval_examples, precision=config.precision)
    final["wall_time_s"] = time.perf_counter() - start_wall
    run.write_final(final)
    plots = run.plot()
    if env.is_main:
        tqdm.write(f"run folder: {run.path}  (plots: {', '.join(str(p) for p in plots)})")
    return {**final, "train_losses": losses}


def _newest(run: RunDir) -> str:
    """Where a stopped run can be resumed from."""
    newest = checkpoint.latest(run.checkpoints)
    return (f"The newest checkpoint, {newest}, is unchanged." if newest is not None
            else "No checkpoint had been written yet.")


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
