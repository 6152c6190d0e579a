"""Process-group setup and model wrapping for `torchrun --nproc_per_node N tools/train.py ...`.

Without torchrun (no WORLD_SIZE in the environment) everything runs in one process and no process
group is created. Under torchrun, gloo is used on CPU and NCCL on CUDA; each rank takes the GPU
`LOCAL_RANK`. Only rank 0 writes files and shows progress (`is_main()`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Initialise the process group when launched by torchrun; pick this rank's device.

    device: "auto" (CUDA when available, else CPU), "cpu", or "cuda".
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, env: Dist, strategy: str = "ddp") -> nn.Module:
    """Wrap for data parallelism. strategy: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2
    `fully_shard` on every block of the stack, then on the whole model). A no-op in one process.

    FSDP2 cannot shard 0-dim parameters (Sessa's gamma_bias): they stay replicated on every rank
    and `average_replicated_grads` all-reduces their gradients after backward."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if not env.enabled:
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    scalars = {p for p in model.parameters() if p.ndim == 0}
    for block in shard_units(model):
        fully_shard(block, ignored_params=scalars & set(block.parameters()) or None)
    fully_shard(model, ignored_params=scalars or None)
    return model


def average_replicated_grads(model: nn.Module) -> None:
    """Under FSDP2, average over ranks the gradients of the parameters it left unsharded (plain
    tensors among DTensors); DDP and FSDP reduce all the others themselves."""
    from torch.distributed.tensor import DTensor

    if not dist.is_initialized():
        return
    params = [p for p in model.parameters() if p.grad is not None and not isinstance(p, DTensor)]
    if params and any(isinstance(p, DTensor) for p in model.parameters()):
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= dist.get_world_size()


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards separately: the entries of every nn.ModuleList (the stack's layers)."""
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under a DDP wrapper (FSDP2 modifies the model in place, nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place); identity in one process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order; `[obj]` in one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
