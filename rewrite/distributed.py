"""Data-parallel recovery under torchrun: the process group, each rank's shard of a batch, one writer.

`torchrun --nproc-per-node=N -m rewrite optimize … --recover steps=S` starts N copies of the same run. Each
captures and rewrites the same model (deterministic, seeded); during recovery each trains on its 1/N of
every calibration batch inside DistributedDataParallel (gloo on CPU, nccl on GPU), so the gradients are
those of the whole batch; only rank 0 writes the output folder. With one process nothing changes.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from rewrite.errors import RewriteError


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (no-op without WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shard(batch: Any, what: str = "calibration batch") -> Any:
    """This rank's equal share of every tensor's first (batch) axis."""
    if world() == 1:
        return batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(x, what) for x in batch)
    if not isinstance(batch, torch.Tensor) or batch.dim() == 0:
        return batch
    if batch.shape[0] % world():
        raise RewriteError(f"a {what} has {batch.shape[0]} samples, which {world()} processes cannot share "
                           "equally: give batches whose size is a multiple of --nproc-per-node")
    return batch.chunk(world())[rank()]


def total(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a (detached) tensor."""
    if world() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel when running data-parallel (gradients averaged over ranks)."""
    if world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, find_unused_parameters=True)
