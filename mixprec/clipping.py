"""Clipping folded into the optimizer step: the one hand-over between GradScaler, the
optimizers and Precision.

torch's recipe (scaler.unscale_(opt); clip_grad_norm_(params, max_norm); scaler.step(opt))
rewrites every gradient twice before the step reads it once more. Here the gradients are read
once: `measure()` computes the norm of grads / scale and the inf/NaN check in that one read and
returns a `ClipResult`; an optimizer that folds clipping (the `FoldsClip` protocol: a public
`fold_clip(result)` method) keeps the result and its next step() multiplies each gradient by
1/scale and the clip coefficient inside its own kernel. Nothing here reads a device value on the
host, so the hand-over is free of synchronisation and safe under CUDA-graph capture.

The rules a folding optimizer follows: step() applies the result it was last given and drops it;
zero_grad() drops it (the coefficient belongs to the gradients it was measured on); a new
fold_clip() replaces it. GradScaler recognises such an optimizer by isinstance(opt, FoldsClip);
any other optimizer gets torch's unscale_ + torch.nn.utils.clip_grad_norm_.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mixprec import ops
from mixprec.distributed import agree_norm, local, shard_group
from mixprec.loss_scaler import reciprocal_fp32


@dataclass(frozen=True)
class ClipResult:
    """One read of an optimizer's gradients, as device tensors (0-dim fp32).

    total_norm: the norm of the unscaled gradients (what torch's clip_grad_norm_ returns);
    clip_coef: per device of the gradients, torch's clamp(max_norm / (total_norm + 1e-6), max=1);
    found_inf: per device, nonzero when the gradients held inf/NaN;
    scale: the loss scale the gradients carried (None: they were unscaled), and inv_scale, its
    reciprocal as torch.amp computes it, taken at the scale's version `scale_version`.
    """

    total_norm: Tensor
    clip_coef: dict[torch.device, Tensor]
    found_inf: dict[torch.device, Tensor]
    scale: Tensor | None = None
    inv_scale: Tensor | None = None
    scale_version: int = 0

    def inv_scale_for(self, grad_scale: Tensor) -> Tensor:
        """1 / grad_scale for the step: the reciprocal computed by measure() when grad_scale is
        the very scale tensor it used, unchanged since (one kernel fewer per step); computed
        afresh otherwise."""
        if self.scale is grad_scale and self.scale_version == grad_scale._version:
            return self.inv_scale
        return reciprocal_fp32(grad_scale)


@runtime_checkable
class FoldsClip(Protocol):
    """An optimizer whose step() applies a ClipResult (its clip coefficient, and 1/scale when the
    step gets a grad_scale) inside its update, so that clipping never rewrites the gradients.
    fold_clip(result) hands it the result for its next step(); zero_grad() must drop it."""

    def fold_clip(self, result: ClipResult) -> None: ...


@torch.no_grad()
def measure(optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0, *,
            scale: Tensor | None = None, process_group: Any = None) -> ClipResult:
    """Read `optimizer`'s gradients once: the norm of grads / `scale` (None: the grads are
    unscaled), the clip coefficient for `max_norm` and the inf/NaN check. Writes nothing.
    Sharded grads (FSDP2 DTensors, or `process_group` given) get the global norm and found_inf,
    agreed with one all-reduce."""
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
    per_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    all_grads = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
                all_grads.append(p.grad)
                per_device[local(p.grad).device].append(local(p.grad))
    if not per_device:
        return ClipResult(torch.tensor(0.0), {}, {})
    sharded_over = shard_group(all_grads, process_group)
    if sharded_over is not None and len(per_device) > 1:
        raise ValueError("sharded gradients must be on one device per rank")
    if scale is not None and len(per_device) == 1 and sharded_over is None:
        # The common case in one op: two kernels where the general path below takes five.
        device, grads = next(iter(per_device.items()))
        total, coef, found_inf, inv_scale = ops.clip_grad_norm_scaled(
            grads, scale.to(device, non_blocking=True), norm_type, max_norm)
        return ClipResult(total, {device: coef}, {device: found_inf}, scale, inv_scale, scale._version)
    inv_scale = None if scale is None else reciprocal_fp32(scale)
    norms, found = [], {}
    for device, grads in per_device.items():
        found[device] = torch.zeros((), dtype=torch.float32, device=device)
        inv = (torch.ones((), dtype=torch.float32, device=device) if inv_scale is None
               else inv_scale.to(device, non_blocking=True))
        norms.append(ops.grad_norm(grads, found[device], inv, norm_type))
    first = next(iter(per_device))
    if sharded_over is not None:  # every rank holds a shard: agree on the global norm
        norms[0], found[first] = agree_norm(norms[0], found[first], norm_type, sharded_over)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(
        torch.stack([n.to(first, non_blocking=True) for n in norms]), norm_type)
    coef = ops.clip_coef(total, max_norm)   # torch's formula and clamp, bit for bit
    clip = {d: coef.to(d, non_blocking=True) for d in per_device}
    if scale is None:
        return ClipResult(total, clip, found)
    return ClipResult(total, clip, found, scale, inv_scale, scale._version)


def clip_folded_(optimizer: FoldsClip, max_norm: float, norm_type: float = 2.0, *,
                 scale: Tensor | None = None, process_group: Any = None) -> ClipResult:
    """measure() the gradients of a FoldsClip optimizer and hand it the result: its next step()
    clips (and unscales by 1/scale). Returns the result (result.total_norm is the norm)."""
    if not isinstance(optimizer, FoldsClip):
        raise TypeError(f"optimizer must implement fold_clip(result) (mixprec.clipping.FoldsClip), "
                        f"got {type(optimizer).__name__}")
    result = measure(optimizer, max_norm, norm_type, scale=scale, process_group=process_group)
    optimizer.fold_clip(result)
    return result
