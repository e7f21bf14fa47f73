"""Sharded gradients (FSDP2's DTensors, or any setup where each rank holds a shard): the ranks
must agree on found_inf and on the gradient norm, or they would skip different steps and clip
by different norms. This module finds the group the grads are sharded over and agrees with one
all-reduce on torch.distributed (enqueued on the stream: no host synchronisation on NCCL).

Replicated grads (DDP, single process) need nothing: DDP's all-reduce already made every rank's
grads equal, so every rank computes the same found_inf and norm by itself.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed support
    dist, DTensor, Shard = None, None, None


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds (a DTensor's local shard; any other tensor itself). Kernels run
    on local shards: elementwise updates need nothing else."""
    return t._local_tensor if DTensor is not None and isinstance(t, DTensor) else t


def shard_group(grads: Iterable[Tensor], process_group: Any = None) -> Any:
    """The process group the grads are sharded over: `process_group` if given; else the mesh of
    DTensor grads that have a Shard placement (a 1-D mesh: FSDP2); else None (replicated)."""
    if process_group is not None:
        return process_group
    if DTensor is None:
        return None
    for g in grads:
        if isinstance(g, DTensor) and any(isinstance(pl, Shard) for pl in g.placements):
            if g.device_mesh.ndim != 1:
                raise ValueError(
                    "gradients are sharded over a multi-dimensional device mesh; pass the process "
                    "group they are sharded over as GradScaler(..., process_group=...)"
                )
            return g.device_mesh.get_group()
    return None


def agree_found_inf(found: dict[torch.device, Tensor], group: Any) -> None:
    """found_inf (per device, in place) becomes nonzero on every rank if it is on any."""
    if group is None:
        return
    for flag in found.values():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)


def agree_norm(norm: Tensor, found: Tensor, norm_type: float, group: Any) -> tuple[Tensor, Tensor]:
    """The global p-norm from each rank's norm of its shard, and found_inf agreed, in one
    all-reduce: sum of norm^p (max for the inf-norm) and max of found_inf."""
    if math.isinf(norm_type):
        both = torch.stack([norm, found])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        return both[0], both[1]
    # SUM for both: found_inf only needs to be nonzero somewhere.
    both = torch.stack([norm.double() ** norm_type, found.double()])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    return (both[0] ** (1.0 / norm_type)).float(), (both[1] != 0).float()
