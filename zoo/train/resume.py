"""Starting a run in its folder: a fresh start, a resume, or nothing to do, decided before any write.

    plan = prepare(run, config, resume=True, set_aside=False)   # checks only; raises or returns a Plan
    restore(plan, model, optimizer, scheduler, config, env)     # weights, optimizer, schedule, RNG

The rules (docs/training.md, "What is never lost"):
  * a new run refuses a folder that holds any run artefact, unless `set_aside` moves the old run
    whole to a sibling folder first; runs never mix in one folder;
  * `resume` continues from the latest checkpoint. A run that already reached TrainConfig.steps
    (with its final_metrics.json) is left untouched; fewer steps than the checkpoint's is refused
    naming both numbers; more steps continue, re-evaluating the default learning-rate schedule
    for the new total from the checkpoint's step on;
  * a torn last line of metrics.jsonl (a kill in the middle of an append) is dropped on resume;
    any other damaged line is an error naming the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from zoo.train import checkpoint, distributed
from zoo.train.run_dir import FINAL, RunDir, read_final


@dataclass
class Plan:
    """What a call to `train` will do: start at `start_step` (0, or a checkpoint's step)."""

    start_step: int = 0
    checkpoint: Path | None = None
    state: dict | None = None
    finished: dict | None = None  # the run already finished: its final metrics, and nothing to do
    finishing: bool = False  # the checkpoint is at TrainConfig.steps but the final evaluation is missing


def on_main(env: distributed.Dist, fn):
    """Run `fn()` on rank 0 only; its exception, if any, is raised on every rank."""
    if not env.enabled:
        return fn()
    error, result = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    errors = distributed.all_gather_objects(error)
    if errors[0] is not None:
        raise errors[0]
    return result


def claim_folder(run: RunDir, *, resume: bool, set_aside: bool) -> None:
    """Lock the run folder; without `resume`, refuse one that holds a run, or move that run aside."""
    if resume and set_aside:
        raise ValueError("--resume continues the run in the folder and --set_aside moves it away: give one of them")
    run.lock()
    found = run.existing_artefacts()
    if resume or not found:
        return
    if not set_aside:
        raise FileExistsError(f"{run.path} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                              f"--set_aside (train(..., set_aside=True)) to move it whole to "
                              f"{run.path.name}.set-aside-<date>-<time> and start afresh, or choose another run folder")
    moved = run.set_aside()
    run.unlock()
    run.lock()
    tqdm.write(f"set aside the previous run of {run.path} ({', '.join(found)}): it is now in {moved}")


def prepare(run: RunDir, config, *, resume: bool) -> Plan:
    """Decide where the run starts, checking everything a resume needs before anything is written."""
    if not resume:
        return Plan()
    ckpt = checkpoint.latest(run.checkpoints)
    if ckpt is None:
        found = run.existing_artefacts()
        hint = (f"; the folder holds {', '.join(found)} from a run that stopped before its first checkpoint: "
                "pass --set_aside instead of --resume to keep it aside and start afresh") if found else ""
        raise FileNotFoundError(f"--resume: no checkpoint in {run.checkpoints}{hint}")
    state = checkpoint.read_state(ckpt)
    step = state.get("step")
    if not isinstance(step, int):
        raise checkpoint.CheckpointCorruptError(f"{ckpt / checkpoint.STATE} has no integer 'step'")
    if step > config.steps:
        raise ValueError(f"--resume: the latest checkpoint {ckpt} is at step {step}, but TrainConfig.steps = "
                         f"{config.steps} asks for fewer; nothing was changed. Resume with TrainConfig.steps >= {step} "
                         "to continue it, or evaluate it as it is (tools/evaluate.py)")
    seed = state.get("data", {}).get("seed")
    if seed != config.seed:
        raise ValueError(f"--resume: the checkpoint {ckpt} was trained with seed={seed}, but TrainConfig.seed = "
                         f"{config.seed}; nothing was changed")
    if step == config.steps and (run.path / FINAL).is_file():
        return Plan(step, ckpt, state, finished=read_final(run.path))
    return Plan(step, ckpt, state, finishing=step == config.steps)


def trim_metrics(run: RunDir, plan: Plan) -> None:
    """Drop the records logged after the checkpoint (the resumed run logs them again, exactly) and
    a torn last line. When only the final evaluation is missing, its validation record goes too."""
    k = plan.start_step

    def keep(record: dict) -> bool:
        return record["step"] < k or (record["step"] == k and not (plan.finishing and record.get("split") == "validation"))

    dropped, torn = run.truncate(keep)
    if torn:
        tqdm.write(f"resume: dropped the torn last line of {run.path / 'metrics.jsonl'} "
                   "(the process was stopped while writing it)")
    if dropped:
        tqdm.write(f"resume: dropped {dropped} record(s) of metrics.jsonl logged after step {k}")


def restore(plan: Plan, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, config,
            env: distributed.Dist) -> None:
    """Load the checkpoint's weights, optimizer, schedule and RNG states into a freshly built run."""
    state = plan.state
    checkpoint.load_model_weights(model, plan.checkpoint)
    checkpoint.restore_optimizer(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["schedule"])
    old_steps = state.get("config", {}).get("steps", config.steps)
    if old_steps != config.steps:
        _reevaluate_schedule(optimizer, scheduler, plan.start_step, old_steps, config.steps, env)
    world = env.world_size
    if len(state["rng"]) == world:
        checkpoint.set_rng_state(state["rng"][env.rank])
    elif env.is_main:
        tqdm.write(f"resume: checkpoint has RNG states of {len(state['rng'])} processes, running on {world}; "
                   "their RNG states are not restored (weights, optimizer and data order are)")
    if env.is_main:
        tqdm.write(f"resumed from {plan.checkpoint} at step {plan.start_step}")


def _reevaluate_schedule(optimizer, scheduler, step: int, old: int, new: int, env: distributed.Dist) -> None:
    """TrainConfig.steps changed: a LambdaLR (the default warmup + cosine) is evaluated for the new
    total from `step` on; other schedulers continue as saved."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
        note = f"the learning-rate schedule is re-evaluated for {new} steps from step {step} on (lr now {lrs[0]:.3g})"
    else:
        note = f"{type(scheduler).__name__} continues as saved"
    if env.is_main:
        tqdm.write(f"resume: TrainConfig.steps {old} -> {new}: {note}")
