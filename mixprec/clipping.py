"""Clipping folded into the optimizer step: the one hand-over between GradScaler, the
optimizers and Precision.

torch's recipe (scaler.unscale_(opt); clip_grad_norm_(params, max_norm); scaler.step(opt))
rewrites every gradient twice before the step reads it once more. Here the gradients are read
once: `measure()` computes the norm of grads / scale (torch's own norm ops, so torch's bits) and
the inf/NaN check from it, and returns a `ClipResult`; an optimizer that folds clipping (the `FoldsClip` protocol: a public
`fold_clip(result)` method) keeps the result and its next step() multiplies each gradient by
1/scale and the clip coefficient inside its own kernel. Nothing here reads a device value on the
host, so the hand-over is free of synchronisation and safe under CUDA-graph capture.

The rules a folding optimizer follows: step() applies the result it was last given and drops it;
zero_grad() drops it (the coefficient belongs to the gradients it was measured on); a new
fold_clip() replaces it, and fold_clip(None) drops it (GradScaler does when it skips the step). GradScaler recognises such an optimizer by isinstance(opt, FoldsClip);
any other optimizer gets torch's unscale_ + torch.nn.utils.clip_grad_norm_. Where a norm of scaled
grads cannot equal torch's bit for bit (a scale that is not a power of two, norm types other than
1, 2 and inf: needs_unscaled_grads), GradScaler unscales in place first, as torch does.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

# The groups torch.nn.utils.clip_grad_norm_ takes its norms in, in its order (the total norm's bits
# depend on that order), and its test for the foreach kernels: torch's own helpers, not a copy.
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from mixprec import ops
from mixprec.distributed import agree_norm, local, shard_group
from mixprec.loss_scaler import reciprocal_fp32


@dataclass(frozen=True)
class ClipResult:
    """One read of an optimizer's gradients, as 0-dim device tensors.

    total_norm: the norm of the unscaled gradients, what torch's clip_grad_norm_ returns (its
    dtype too: bf16 when every grad is bf16);
    clip_coef: per device of the gradients, torch's clamp(max_norm / (total_norm + 1e-6), max=1)
    in fp32 (computed in total_norm's dtype, as torch does);
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
    fold_clip(result) hands it the result for its next step(), fold_clip(None) drops it;
    zero_grad() must drop it too."""

    def fold_clip(self, result: ClipResult | None) -> None: ...


# Norm types whose per-tensor norm scales exactly with a power-of-two scale (sums of |x| or x*x, or
# a max): for these a norm taken on scaled grads times 1/scale is the norm of the unscaled grads.
_SCALE_EXACT_NORMS = (1.0, 2.0, math.inf)


def is_pow2(x: float) -> bool:
    """A power of two that is a normal fp32 number (its reciprocal is one too)."""
    return 2.0**-126 <= x <= 2.0**126 and math.frexp(x)[0] == 0.5


def _has_fp16(grads: list[Tensor]) -> bool:
    return any(g.dtype == torch.float16 for g in grads)


def needs_unscaled_grads(optimizer: torch.optim.Optimizer, norm_type: float, scale_is_pow2: bool,
                         process_group: Any = None) -> bool:
    """Whether torch's norm can only be had from grads unscaled in place first (torch.amp's
    unscale_): fp32/bf16 grads with a scale that is not a power of two, or a norm type other than
    1, 2 and inf. Not for fp16 grads (torch.amp refuses to unscale them, so measure() takes their
    norm from the scaled grads in fp32) nor sharded ones (our agreed norm either way). Reads no
    device value."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if _has_fp16(grads) or shard_group(grads, process_group) is not None:
        return False
    return not (scale_is_pow2 and float(norm_type) in _SCALE_EXACT_NORMS)


def _torch_total_norm(grads: list[Tensor], norm_type: float, inv_scale: Tensor | None
                      ) -> tuple[Tensor, Tensor]:
    """torch.nn.utils.get_total_norm's computation step for step, so its bits and dtype: each
    grad's norm (foreach per (device, dtype) group), then the norm of those. With inv_scale (a
    power of two, grads of fp32/bf16), each grad's norm is taken on the scaled grad and multiplied
    by inv_scale, which is exact while no value leaves the normal range: see measure().
    Also returns found_inf (0-dim fp32 on the first device): 1.0 when a grad's norm is inf/NaN."""
    first = grads[0].device
    per_group = []
    for (device, _), ([tensors], _) in _group_tensors_by_device_and_dtype([grads]).items():
        if _has_foreach_support(tensors, device):
            norms = torch._foreach_norm(tensors, norm_type)
        else:
            norms = [torch.linalg.vector_norm(g, norm_type) for g in tensors]
        group = torch.stack(norms)
        if inv_scale is not None:
            group = group * inv_scale.to(device, non_blocking=True)
        per_group.append(group.to(first, non_blocking=True))
    # torch stacks every norm at once; the concatenation of the groups' stacks is that tensor
    # (same values, order and promoted dtype).
    norms = per_group[0] if len(per_group) == 1 else torch.cat(per_group)
    total = torch.linalg.vector_norm(norms, norm_type)
    # A sum of squares or |x| (or a max that propagates NaN) is inf/NaN iff an element is, or the
    # sum overflowed: no host read, and no extra pass over the grads.
    found_inf = torch.isfinite(norms).all().logical_not().to(torch.float32)
    return total, found_inf


def _own_total_norm(per_device: dict[torch.device, list[Tensor]], norm_type: float,
                    inv_scale: Tensor | None, sharded_over: Any
                    ) -> tuple[Tensor, dict[torch.device, Tensor]]:
    """Our one-read kernels: the norm of all grads * inv_scale accumulated in fp32 (not torch's
    order), and found_inf per device; agreed over `sharded_over` when the grads are shards."""
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
    return total, found


@torch.no_grad()
def measure(optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0, *,
            scale: Tensor | None = None, process_group: Any = None, exact: bool = True) -> ClipResult:
    """Read `optimizer`'s gradients once: the norm of grads / `scale` (None: the grads are
    unscaled), the clip coefficient for `max_norm` and the inf/NaN check. Writes nothing.

    The norm is torch.nn.utils.clip_grad_norm_'s (its ops, grouping and order, so its bits and
    dtype) on unscaled grads. On scaled fp32/bf16 grads it is each grad's norm times 1/scale, then
    torch's norm of those: torch's unscale_ + clip_grad_norm_ bit for bit when the scale is a power
    of two, norm_type is 1, 2 or inf (else see needs_unscaled_grads) and no value leaves fp32's
    normal range on either side of the scale (nonzero |grad| and |grad / scale| >= 2**-63 for the
    2-norm, >= 2**-126 otherwise; each grad's scaled norm < 2**127). found_inf is set when a grad's
    norm is inf/NaN: an inf/NaN element or, beyond that range, a norm overflowing fp32 (torch.amp
    would take that step). Scaled fp16 grads (torch.amp refuses to unscale them) and sharded grads
    (FSDP2 DTensors, or `process_group` given) get our kernel's norm, accumulated in fp32 (agreed
    over the ranks with one all-reduce). exact=False takes that kernel's norm everywhere: one
    read of the grads at full bandwidth and two launches instead of torch's per-tensor norms,
    within a few fp32 ulps of the exact norm (fp32 accumulation in its own order), where torch's
    is bit for bit."""
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
    inv_scale = None if scale is None else reciprocal_fp32(scale)
    if exact and sharded_over is None and not (scale is not None and _has_fp16(all_grads)):
        grads = [local(g) for g in all_grads]  # the optimizer's order, which torch's groups keep
        total, found_inf = _torch_total_norm(grads, norm_type, inv_scale)
        found = {d: found_inf.to(d, non_blocking=True) for d in per_device}
    else:  # our kernels: sharded grads, or scaled fp16 ones (norm of grads / scale in fp32)
        total, found = _own_total_norm(per_device, norm_type, inv_scale, sharded_over)
    if total.dtype == torch.float32:
        coef = ops.clip_coef(total, max_norm)   # torch's formula and clamp, bit for bit
    else:  # torch's formula in the norm's dtype (bf16); the step takes the coefficient in fp32
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).to(torch.float32)
    clip = {d: coef.to(d, non_blocking=True) for d in per_device}
    if scale is None:
        return ClipResult(total, clip, found)
    return ClipResult(total, clip, found, scale, inv_scale, scale._version)


def clip_folded_(optimizer: FoldsClip, max_norm: float, norm_type: float = 2.0, *,
                 scale: Tensor | None = None, process_group: Any = None, exact: bool = True) -> ClipResult:
    """measure() the gradients of a FoldsClip optimizer and hand it the result: its next step()
    clips (and unscales by 1/scale). Returns the result (result.total_norm is the norm)."""
    if not isinstance(optimizer, FoldsClip):
        raise TypeError(f"optimizer must implement fold_clip(result) (mixprec.clipping.FoldsClip), "
                        f"got {type(optimizer).__name__}")
    result = measure(optimizer, max_norm, norm_type, scale=scale, process_group=process_group, exact=exact)
    optimizer.fold_clip(result)
    return result
