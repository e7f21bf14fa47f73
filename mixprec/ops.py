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


def grad_norm(grads: list[Tensor], found_inf: Tensor, inv_scale: Tensor, norm_type: float = 2.0) -> Tensor:
    """The norm_type-norm of all grads * inv_scale (fp32 accumulation, deterministic) as a 0-dim
    fp32 tensor; sets found_inf to 1 if any element is inf/NaN. One read of the grads."""
    return torch.ops.mixprec.grad_norm(grads, found_inf, inv_scale, float(norm_type))


def clip_coef(total_norm: Tensor, max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_'s coefficient, clamp(max_norm / (total_norm + 1e-6),
    max=1), bit for bit, from a 0-dim fp32 norm: one kernel where torch's formula takes four."""
    return torch.ops.mixprec.clip_coef(total_norm, float(max_norm))


def clip_grad_norm_scaled(grads: list[Tensor], scale: Tensor, norm_type: float, max_norm: float
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(total norm of grads / scale, clip coefficient, found_inf, 1 / scale) as 0-dim fp32 tensors,
    bit for bit grad_norm(grads, zeros, reciprocal(scale)), clip_coef(norm, max_norm), that
    found_inf and torch.amp's inv_scale: one read of the grads, and on CUDA two kernels in all."""
    return torch.ops.mixprec.clip_grad_norm_scaled(grads, scale, float(norm_type), float(max_norm))


ROUNDING = {"nearest": 0, "stochastic": 1, "kahan": 2}


def _rounding_code(rounding: str) -> int:
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {sorted(ROUNDING)}, got {rounding!r}")
    return ROUNDING[rounding]


def adam_step_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor], master_params: list[Tensor], steps: list[Tensor], *,
    lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    decoupled_weight_decay: bool, maximize: bool, inv_scale: Tensor | None = None,
    clip_coef: Tensor | None = None, found_inf: Tensor | None = None,
    compensations: list[Tensor] = (), rounding: str = "nearest", seed: int = 0,
) -> None:
    """One fused Adam/AdamW step over params of one dtype on one device (see csrc/ops.cpp).
    fp16/bf16 params without master_params are rounded by `rounding` ("nearest", "stochastic"
    with the Philox stream of `seed`, or "kahan" with one compensation tensor per param)."""
    lr_float, lr_tensor = (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)
    torch.ops.mixprec.adam_step_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, list(compensations),
        steps, lr_float, lr_tensor, float(beta1), float(beta2), float(eps), float(weight_decay),
        bool(decoupled_weight_decay), bool(maximize), inv_scale, clip_coef, found_inf,
        _rounding_code(rounding), int(seed),
    )


def sgd_step_(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
    master_params: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
    inv_scale: Tensor | None = None, clip_coef: Tensor | None = None, found_inf: Tensor | None = None,
    compensations: list[Tensor] = (), rounding: str = "nearest", seed: int = 0,
) -> None:
    """One fused SGD step over params of one dtype on one device (see csrc/ops.cpp); rounding as
    in adam_step_ (stochastic rounding needs steps)."""
    lr_float, lr_tensor = (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)
    torch.ops.mixprec.sgd_step_(
        params, grads, momentum_buffers, master_params, list(compensations), steps, lr_float,
        lr_tensor, float(momentum), float(dampening), float(weight_decay), bool(nesterov),
        bool(maximize), inv_scale, clip_coef, found_inf, _rounding_code(rounding), int(seed),
    )


@torch.library.register_fake("mixprec::grad_norm")
def _grad_norm_fake(grads, found_inf, inv_scale, norm_type) -> Tensor:
    return found_inf.new_empty(())


@torch.library.register_fake("mixprec::clip_coef")
def _clip_coef_fake(total_norm, max_norm) -> Tensor:
    return total_norm.new_empty(())


@torch.library.register_fake("mixprec::clip_grad_norm_scaled")
def _clip_grad_norm_scaled_fake(grads, scale, norm_type, max_norm):
    return tuple(scale.new_empty(()) for _ in range(4))


@torch.library.register_fake("mixprec::adam_step_")
def _adam_step_fake(*args) -> None:
    return None


@torch.library.register_fake("mixprec::sgd_step_")
def _sgd_step_fake(*args) -> None:
    return None
