"""Typed wrappers over torch.ops.mixprec.* and their fake kernels (so torch.compile can trace
them). No maths here: the kernels live in csrc/.

Importing this module loads nothing: each wrapper loads the extension at its first call.
_extension.load() registers the fake kernels below as soon as the ops exist (torch makes a fake
kernel the op's Meta kernel, which needs the op), whoever loads the extension first."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mixprec import _extension

_FAKE_KERNELS: dict[str, Callable[..., Any]] = {}


def _fake(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def keep(fn: Callable[..., Any]) -> Callable[..., Any]:
        _FAKE_KERNELS[name] = fn
        return fn
    return keep


def register_fake_kernels() -> None:
    """Register the fake kernels of this module; called once by _extension.load()."""
    for name, fn in _FAKE_KERNELS.items():
        torch.library.register_fake(f"mixprec::{name}", fn)


def op_names() -> list[str]:
    """Every op of the mixprec namespace ("mixprec::grad_norm", ...), as the dispatcher lists
    them once the extension is loaded: the one list that kernel and coverage checks use."""
    _extension.load()
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mixprec::"))


def ops_without_kernel(dispatch_key: str) -> list[str]:
    """The mixprec ops with no kernel for `dispatch_key` ("CPU", "CUDA", "Meta", ...)."""
    return [n for n in op_names() if not torch._C._dispatch_has_kernel_for_dispatch_key(n, dispatch_key)]


def library() -> torch._ops._OpNamespace:
    """torch.ops.mixprec, with the extension loaded (built first where needed)."""
    _extension.load()
    return torch.ops.mixprec


def non_finite_check_and_unscale_(grads: list[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    """grads[i] *= inv_scale in fp32 arithmetic; found_inf (1-element fp32) is set to 1 if any
    element is inf/NaN, else left as it was. All tensors on one device; any float dtype mix."""
    library().non_finite_check_and_unscale_(grads, found_inf, inv_scale)


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
    library().update_scale_(
        scale, growth_tracker, hysteresis_tracker, counters, found_inf,
        float(growth_factor), float(backoff_factor), int(growth_interval), int(hysteresis),
        float(min_scale), float(max_scale),
    )


@_fake("non_finite_check_and_unscale_")
def _unscale_fake(grads, found_inf, inv_scale) -> None:
    return None


@_fake("update_scale_")
def _update_scale_fake(scale, growth_tracker, hysteresis_tracker, counters, found_inf,
                       growth_factor, backoff_factor, growth_interval, hysteresis,
                       min_scale, max_scale) -> None:
    return None


def grad_norm(grads: list[Tensor], found_inf: Tensor, inv_scale: Tensor, norm_type: float = 2.0) -> Tensor:
    """The norm_type-norm of all grads * inv_scale (fp32 accumulation, deterministic) as a 0-dim
    fp32 tensor; sets found_inf to 1 if any element is inf/NaN. One read of the grads."""
    return library().grad_norm(grads, found_inf, inv_scale, float(norm_type))


def clip_coef(total_norm: Tensor, max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_'s coefficient, clamp(max_norm / (total_norm + 1e-6),
    max=1), bit for bit, from a 0-dim fp32 norm: one kernel where torch's formula takes four."""
    return library().clip_coef(total_norm, float(max_norm))


def clip_grad_norm_scaled(grads: list[Tensor], scale: Tensor, norm_type: float, max_norm: float
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(total norm of grads / scale, clip coefficient, found_inf, 1 / scale) as 0-dim fp32 tensors,
    bit for bit grad_norm(grads, zeros, reciprocal(scale)), clip_coef(norm, max_norm), that
    found_inf and torch.amp's inv_scale: one read of the grads, and on CUDA two kernels in all."""
    return library().clip_grad_norm_scaled(grads, scale, float(norm_type), float(max_norm))


# The rounding modes the optimizer ops take by name (C++ parses them: rounding.h's kRoundingNames;
# tests/test_ops.py checks the two agree). Here so optimizers can refuse a bad name at construction,
# before any kernel is loaded.
ROUNDING_MODES = ("nearest", "stochastic", "kahan")


def adam_step_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor], master_params: list[Tensor], steps: list[Tensor], *,
    lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    decoupled_weight_decay: bool, maximize: bool, inv_scale: Tensor | None = None,
    clip_coef: Tensor | None = None, found_inf: Tensor | None = None,
    compensations: list[Tensor] = (), rounding: str = "nearest", seed: int = 0,
    store_grads: bool = False,
) -> None:
    """One fused Adam/AdamW step over params of one dtype on one device (see csrc/ops.cpp).
    fp16/bf16 params without master_params are rounded by `rounding` ("nearest", "stochastic"
    with the random stream of `seed`, see rounding.h, or "kahan" with one compensation tensor per param).
    store_grads: write grad * inv_scale * clip_coef back into grads."""
    lr_float, lr_tensor = (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)
    library().adam_step_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, list(compensations),
        steps, lr_float, lr_tensor, float(beta1), float(beta2), float(eps), float(weight_decay),
        bool(decoupled_weight_decay), bool(maximize), inv_scale, clip_coef, found_inf,
        rounding=rounding, seed=int(seed), store_grads=bool(store_grads),
    )


def sgd_step_(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
    master_params: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
    inv_scale: Tensor | None = None, clip_coef: Tensor | None = None, found_inf: Tensor | None = None,
    compensations: list[Tensor] = (), rounding: str = "nearest", seed: int = 0,
    store_grads: bool = False,
) -> None:
    """One fused SGD step over params of one dtype on one device (see csrc/ops.cpp); rounding and
    store_grads as in adam_step_ (stochastic rounding needs steps)."""
    lr_float, lr_tensor = (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)
    library().sgd_step_(
        params, grads, momentum_buffers, master_params, list(compensations), steps, lr_float,
        lr_tensor, float(momentum), float(dampening), float(weight_decay), bool(nesterov),
        bool(maximize), inv_scale, clip_coef, found_inf, rounding=rounding, seed=int(seed),
        store_grads=bool(store_grads),
    )


# The storage names adam_step_compressed_ takes (C++ parses them: compressed_checks.h's tables;
# tests/test_compressed_state.py checks the two agree).
MOMENT_STORAGES = ("fp32", "bf16", "8bit", "fp8")
WEIGHT_STORAGES = ("plain", "master", "remainder", "stochastic")


def adam_step_compressed_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    exp_avg_absmax: list[Tensor], exp_avg_sq_absmax: list[Tensor], master_params: list[Tensor],
    remainders: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float,
    eps: float, weight_decay: float, decoupled_weight_decay: bool, maximize: bool,
    signed_map: Tensor, unsigned_map: Tensor, moments: str, weights: str,
    inv_scale: Tensor | None = None, clip_coef: Tensor | None = None, found_inf: Tensor | None = None,
    seed: int = 0, store_grads: bool = False,
) -> None:
    """One fused Adam/AdamW step with compressed state (see csrc/ops.cpp): moments "fp32", "bf16"
    or "8bit" (with one absmax per 256-element block and the two 256-entry maps), or "fp8"
    (float8_e4m3fn, with one absmax per block; the maps are not read), weights "plain",
    "master", "remainder" or "stochastic"."""
    lr_float, lr_tensor = (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)
    library().adam_step_compressed_(
        params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmax, exp_avg_sq_absmax, master_params, remainders,
        steps, lr_float, lr_tensor, float(beta1), float(beta2), float(eps), float(weight_decay),
        bool(decoupled_weight_decay), bool(maximize), inv_scale, clip_coef, found_inf, signed_map, unsigned_map,
        moments=moments, weights=weights, seed=int(seed), store_grads=bool(store_grads),
    )


def quantize_blockwise(x: Tensor, qmap: Tensor) -> tuple[Tensor, Tensor]:
    """(uint8 codes of x's shape, fp32 absmax per 256-element block): the nearest entry of the
    sorted 256-entry `qmap` to x / absmax, the codes the optimizer step itself writes."""
    return library().quantize_blockwise(x, qmap)


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """fp32 values qmap[code] * absmax[block] (the inverse of quantize_blockwise, up to rounding)."""
    return library().dequantize_blockwise(codes, absmax, qmap)


def fp8_amax(x: Tensor) -> Tensor:
    """max |x| as a 0-dim fp32 tensor on x's device (NaN if x holds one); x contiguous."""
    return library().fp8_amax(x)


def fp8_cast(x: Tensor, amax: Tensor, dtype: torch.dtype, *, shrink: float = 1.0,
             transpose: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(x * scale rounded to the fp8 `dtype` as torch rounds it, its transpose (2-d x, with
    transpose=True; else empty), 1 / scale), scale = fp8_max / amax * shrink (1 * shrink for an
    amax of 0, inf or NaN)."""
    return library().fp8_cast(x, amax, dtype, shrink=shrink, transpose=transpose)


def fp8_cast_delayed(x: Tensor, history: Tensor, overflows: Tensor, dtype: torch.dtype, *, shrink: float = 1.0,
                     reduce: str = "max", transpose: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """fp8_cast with amax = history.max() (reduce "max") or history[0] ("most_recent"), in one
    pass that also reduces max |x|; then, in place, history = [max |x|, *history[:-1]] and
    overflows (int64) += 1 where max |x| > fp8_max / scale or is NaN (values saturated)."""
    return library().fp8_cast_delayed(x, history, overflows, dtype, shrink=shrink, reduce=reduce,
                                      transpose=transpose)


@_fake("fp8_amax")
def _fp8_amax_fake(x):
    return x.new_empty((), dtype=torch.float32)


def _fp8_cast_outputs(x, dtype, transpose):
    shape_t = (x.shape[1], x.shape[0]) if transpose else (0,)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(shape_t, dtype=dtype), x.new_empty((), dtype=torch.float32)


@_fake("fp8_cast")
def _fp8_cast_fake(x, amax, dtype, *, shrink=1.0, transpose=False):
    return _fp8_cast_outputs(x, dtype, transpose)


@_fake("fp8_cast_delayed")
def _fp8_cast_delayed_fake(x, history, overflows, dtype, *, shrink=1.0, reduce="max", transpose=False):
    return _fp8_cast_outputs(x, dtype, transpose)


@_fake("grad_norm")
def _grad_norm_fake(grads, found_inf, inv_scale, norm_type) -> Tensor:
    return found_inf.new_empty(())


@_fake("clip_coef")
def _clip_coef_fake(total_norm, max_norm) -> Tensor:
    return total_norm.new_empty(())


@_fake("clip_grad_norm_scaled")
def _clip_grad_norm_scaled_fake(grads, scale, norm_type, max_norm):
    return tuple(scale.new_empty(()) for _ in range(4))


@_fake("adam_step_")
def _adam_step_fake(*args, **kwargs) -> None:
    return None


@_fake("sgd_step_")
def _sgd_step_fake(*args, **kwargs) -> None:
    return None


@_fake("adam_step_compressed_")
def _adam_step_compressed_fake(*args, **kwargs) -> None:
    return None


@_fake("quantize_blockwise")
def _quantize_blockwise_fake(x, qmap):
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(((x.numel() + 255) // 256,), dtype=torch.float32)


@_fake("dequantize_blockwise")
def _dequantize_blockwise_fake(codes, absmax, qmap):
    return codes.new_empty(codes.shape, dtype=torch.float32)
