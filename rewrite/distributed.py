"""Data-parallel recovery under torchrun: the process group, each rank's shard of a batch, one writer.

`torchrun --nproc-per-node=N -m rewrite optimize … --recover steps=S` starts N copies of the same run. Each
captures and rewrites the same model (deterministic, seeded); during recovery each trains on its 1/N of
every calibration batch inside DistributedDataParallel (gloo on CPU, nccl on GPU), so the gradients are
those of the whole batch; only rank 0 writes the output folder. With one process nothing changes.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist

from rewrite.errors import RewriteError


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (no-op without WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # A process that dies makes the others' collectives fail; one that hangs, time out after this long.
        timeout = datetime.timedelta(seconds=float(os.environ.get("REWRITE_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)


def agree(arguments: dict[str, Any]) -> None:
    """Every process of the run was started with the same arguments and data; if not, each says which
    differ, before any work."""
    if world() == 1:
        return
    mine = {name: _digest(value) for name, value in arguments.items()}
    everyone: list[Any] = [None] * world()
    dist.all_gather_object(everyone, mine)
    for other, theirs in enumerate(everyone):
        differ = [name for name in mine if theirs.get(name) != everyone[0].get(name)]
        if differ:
            raise RewriteError(f"the processes of this torchrun run were given different {', '.join(differ)} (rank "
                               f"{other} differs from rank 0): start every process with the same command and data")


def _digest(value: Any) -> str:
    from torch.utils._pytree import tree_leaves
    digest = hashlib.sha256()
    for leaf in tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            digest.update(f"{leaf.dtype}{tuple(leaf.shape)}".encode())
            digest.update(leaf.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


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


def lost_peer(exc: BaseException) -> bool:
    """A collective failed because another process of a torchrun run died or stopped answering: the whole
    run is over, so no pass may treat it as its own failure and roll back."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and isinstance(exc, (dist.DistError, RuntimeError)) and (
        isinstance(exc, dist.DistError) or any(s in str(exc) for s in ("Connection closed by peer", "Timed out",
                                                                         "Connection reset by peer", "gloo")))


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
