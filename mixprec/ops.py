"""Typed wrappers over torch.ops.mixprec.* and their fake kernels (so torch.compile can trace
them). No maths here: the kernels live in csrc/."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mixprec import _extension

_extension.load()


def non_finite_check_and_unscale_(grads: list[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    """grads[i] *= inv_scale in fp32 arithmetic; found_inf (1-element fp32) is set to 1 if any
    element is inf/NaN, else left as it was. All tensors on one device; any float dtype mix."""
    torch.ops.mixprec.non_finite_check_and_unscale_(grads, found_inf, inv_scale)


def update_scale_(
    scale: Tensor,
    growth_tracker: Tensor,
    hysteresis_tracker: Tensor,
    counters: Tensor,
    found_inf: Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    hysteresis: int = 1,
    min_scale: float = 0.0,
    max_scale: float = math.inf,
) -> None:
    """torch._amp_update_scale_'s rule on device tensors, plus hysteresis and [min, max] clamping.
    counters (int64[2]) counts overflows and overflows that happened at min_scale."""
    torch.ops.mixprec.update_scale_(
        scale, growth_tracker, hysteresis_tracker, counters, found_inf,
        float(growth_factor), float(backoff_factor), int(growth_interval), int(hysteresis),
        float(min_scale), float(max_scale),
    )


@torch.library.register_fake("mixprec::non_finite_check_and_unscale_")
def _unscale_fake(grads, found_inf, inv_scale) -> None:
    return None


@torch.library.register_fake("mixprec::update_scale_")
def _update_scale_fake(scale, growth_tracker, hysteresis_tracker, counters, found_inf,
                       growth_factor, backoff_factor, growth_interval, hysteresis,
                       min_scale, max_scale) -> None:
    return None
