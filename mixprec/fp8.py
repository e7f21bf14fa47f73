"""fp8 linear layers as a rule of the op-policy table (issue 16, first part): with
``policy.override({F.linear: "fp8"})`` mixprec.autocast runs ``aten::linear`` through
``mixprec_fp8::linear`` below, and every other op under the region's rules. The model is not
changed: same modules, same state_dict.

The recipe: e4m3 activations and weights in forward, e5m2 output grads in backward (the hybrid
recipe of TransformerEngine and torchao), per-tensor "current" scaling: each tensor is scaled by
fp8_max / amax(tensor) before the cast, so its largest value lands on the format's largest, and
the matrix products run through ``torch._scaled_mm`` with the inverse scales (cuBLASLt on Hopper
GPUs; on the CPU the same product of the same fp8 values in fp32, see scaled_mm). Delayed
scaling (amax histories on the device, TransformerEngine's recipe) is an option:
use_delayed_scaling(); its state is plain tensors (state_dict / load_state_dict here; the
model's state_dict is unchanged), and the casts that overflowed their scale are counted
(overflows(), in Precision.stats()). Scales stay on the device: nothing synchronises with the
host. autocast(record=True) reports each fp8 linear's amax, scale, saturated and flushed counts.
The casts are our kernels (mixprec.ops.fp8_amax, fp8_cast and fp8_cast_delayed; CPU and CUDA):
under current scaling one read for the amax and one for the cast, which writes the fp8 copy and
the transposed copy the backward GEMM needs, computing the scale on the device; under delayed
scaling one read in all, the amax reduced in the cast's own pass. Under current scaling each
weight's fp8 copies are made once per version of the weight and cached (clear_weight_cache()).
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}  # 448, 57344
FP8_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (sm_89) and Hopper (sm_90) on
# The filter: on CUDA a linear whose GEMM (M * K * N) is smaller than MIN_GEMM stays in the
# region's dtype, where the casts cost more than the faster product saves. Measured
# (benchmarks/bench_fp8.py --gemms: forward + backward of one linear, the weight recast each call,
# H100, torch 2.11, 2026-12-07): fp8 / bf16 speed 0.51 at 2^31, 0.79 at 2^34, 0.96-0.98 at 2^36,
# 1.09-1.13 at 2^37-2^37.6, 1.17 at 2^38, 1.21 at 2^39 (torchao's H100 figures: 0.80 at 2^31,
# 1.39 at 2^39). torch._scaled_mm needs each operand's dimensions in multiples of 16: K and N
# (forward and input grad) and, on CUDA, M too (the weight grad's product contracts over M); the
# CPU product (scaled_mm) has no such limit.
MIN_GEMM = 2**37


def runs_in_fp8(m: int, k: int, n: int, on_cuda: bool) -> bool:
    """Whether a linear of these GEMM sizes takes fp8 (else the region's dtype): K and N
    multiples of 16 everywhere, and on CUDA M too and a product of at least MIN_GEMM."""
    return k % 16 == 0 and n % 16 == 0 and (not on_cuda or (m % 16 == 0 and m * k * n >= MIN_GEMM))


def current_scale(amax: Tensor, fmt: torch.dtype, shrink: float = 1.0) -> Tensor:
    """fp8_max / amax * shrink in fp32, on amax's device: 1 * shrink where amax is 0 (an all-zero
    tensor) or not finite (then NaN stays NaN and inf saturates at the format's largest value,
    e4m3 having no inf; autocast(record=True) counts it as saturated), and FLT_MAX where the
    scale overflows (an amax below fp8_max / FLT_MAX: an infinite scale would turn the tensor's
    zeros into NaN). The cast kernel computes the same on the device; this form is the reference
    the tests hold it to."""
    amax = amax.float()
    usable = torch.isfinite(amax) & (amax > 0)
    # tensor / tensor: a correctly rounded division (a Python number / tensor is computed as
    # number * reciprocal(tensor), one rounding more)
    scale = torch.where(usable, torch.full_like(amax, FP8_MAX[fmt]) / torch.where(usable, amax, 1.0), 1.0) * shrink
    return scale.clamp(max=torch.finfo(torch.float32).max)


def cast(x: Tensor, fmt: torch.dtype, history: Tensor | None = None, *,
         transpose: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(x * scale saturated to the format's range and rounded to fp8, its transpose (2-d x with
    transpose=True, else an empty tensor), 1 / scale). The scale is x's current one, or with an
    amax `history` (delayed scaling) the one the history gives, after which x's amax (reduced
    in the same pass as the cast, one kernel) enters the history and an overflow is counted.
    Saturating keeps values beyond the range (a grown amax under delayed scaling, or rounding)
    at the format's largest value."""
    from mixprec import ops

    x = x.detach()
    x = x if x.is_contiguous() else x.contiguous()
    if history is None:
        return ops.fp8_cast(x, ops.fp8_amax(x), fmt, transpose=transpose)
    return ops.fp8_cast_delayed(x, history, _delayed.overflow_counter(x.device), fmt, shrink=2.0**-_delayed.margin,
                                reduce=_delayed.reduce, transpose=transpose)


class DelayedScaling:
    """Delayed scaling (TransformerEngine's default recipe): each tensor is scaled by
    fp8_max / reduce(amax history) / 2^margin, the history holding the amaxes of its last
    `history_len` casts (reduce "max" or "most_recent"); the history lives on the device, one per
    operand of each layer, keyed by the layer's weight. Off by default (current scaling); turn
    it on with use_delayed_scaling() (process-wide, as the histories are)."""

    def __init__(self) -> None:
        self.enabled = False
        self.history_len, self.margin, self.reduce = 16, 0, "max"
        self.histories: dict[int, dict[str, Tensor]] = {}  # id(weight) -> operand -> history
        self.overflows: dict[torch.device, Tensor] = {}  # device -> count of overflowing casts

    def overflow_counter(self, device: torch.device) -> Tensor:
        """The device's count of scale overflows: casts whose amax was beyond what the history's
        scale represents (their largest values saturated), or not finite. The cast adds to it."""
        counter = self.overflows.get(device)
        if counter is None:
            counter = self.overflows[device] = torch.zeros((), dtype=torch.int64, device=device)
        return counter

    def history(self, weight: Tensor, operand: str) -> Tensor | None:
        if not self.enabled:
            return None
        per_layer = self.histories.setdefault(id(weight), {})
        if operand not in per_layer:
            per_layer[operand] = torch.zeros(self.history_len, dtype=torch.float32, device=weight.device)
        return per_layer[operand]


_delayed = DelayedScaling()


def use_delayed_scaling(history_len: int = 16, margin: int = 0, reduce: str = "max") -> None:
    """Scale fp8 casts from an amax history (see DelayedScaling) from now on."""
    if history_len < 1 or margin < 0 or reduce not in ("max", "most_recent"):
        raise ValueError("use_delayed_scaling: history_len >= 1, margin >= 0 and reduce 'max' or "
                         f"'most_recent', got {history_len}, {margin}, {reduce!r}")
    _delayed.enabled, _delayed.history_len, _delayed.margin, _delayed.reduce = True, history_len, margin, reduce


def overflows() -> int:
    """How many delayed-scaling casts overflowed their scale (saturated; see
    DelayedScaling.overflow_counter) since the last reset_overflows(). Synchronises: for logging.
    Current scaling never overflows (each tensor's scale comes from its own amax)."""
    return sum(int(c) for c in _delayed.overflows.values())


def reset_overflows() -> None:
    """Start overflows() from 0 again."""
    for counter in _delayed.overflows.values():
        counter.zero_()


def use_current_scaling() -> None:
    """Scale every fp8 cast by its tensor's own amax (the default)."""
    _delayed.enabled = False


def state_dict(model: torch.nn.Module) -> dict[str, dict[str, Tensor]]:
    """The delayed-scaling state of `model`'s fp8 linears as plain tensors: {weight name:
    {"input" | "weight" | "grad": amax history}}. The model's own state_dict is unchanged."""
    return {name: {k: v.clone() for k, v in _delayed.histories[id(p)].items()}
            for name, p in model.named_parameters() if id(p) in _delayed.histories}


def load_state_dict(model: torch.nn.Module, state: dict[str, dict[str, Tensor]]) -> None:
    """Load what state_dict() gave; every entry is checked before any is loaded."""
    params = dict(model.named_parameters())
    for name, histories in state.items():
        if name not in params:
            raise KeyError(f"fp8 state for {name!r}: the model has no such parameter")
        for operand, h in histories.items():
            if operand not in ("input", "weight", "grad") or not isinstance(h, Tensor) or h.dim() != 1 \
                    or not h.is_floating_point():
                raise ValueError(f"fp8 state for {name!r}[{operand!r}] must be a 1-d float amax history")
    for name, histories in state.items():
        p = params[name]
        _delayed.histories[id(p)] = {k: h.detach().to(device=p.device, dtype=torch.float32).clone()
                                     for k, h in histories.items()}


class _Audit(threading.local):
    """Where fp8 linears report their casts while a mixprec.autocast(record=True) region runs
    (None: not recording). Entries hold device tensors, read only when a report is made."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] | None = None


_audit = _Audit()


def record_into(records: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Send the fp8 linears' audit entries to `records` (None: stop); returns the previous list."""
    previous, _audit.records = _audit.records, records
    return previous


def _cast_audit(x: Tensor, x8: Tensor, inv: Tensor, fmt: torch.dtype) -> dict[str, Tensor]:
    """amax, scale, and the counts of values that saturated (beyond the format's range once
    scaled, by more than fp32 rounding: the amax itself may land a few ulps above it) or flushed
    to zero (nonzero, cast to 0): device tensors, no host read."""
    scale = inv.reciprocal().clamp(max=torch.finfo(torch.float32).max)  # 1 / 2^-128 is inf, the scale FLT_MAX
    scaled = x.detach().float() * scale
    return {"amax": x.detach().abs().amax().float(), "scale": scale,
            "saturated": (scaled.abs() > FP8_MAX[fmt] * (1 + 2**-20)).sum(),
            "flushed": ((x != 0) & (x8.float() == 0)).sum()}


def audit_report(records: list[dict[str, Any]]) -> str:
    """A table of the fp8 linears recorded (this reads the device tensors: one sync)."""
    lines = ["fp8 linear (M x K x N)      operand  amax        scale       saturated  flushed"]
    for r in records:
        for operand in ("input", "weight"):
            a = r[operand]
            lines.append(f"{r['shape']:<27} {operand:<8} {a['amax'].item():<11.4g} {a['scale'].item():<11.4g} "
                         f"{int(a['saturated']):>9} {int(a['flushed']):>8}")
    return "\n".join(lines)


# The weight cache: a weight's fp8 copy, made once per version of the weight (an optimizer step
# bumps it), so micro-batches, activation recomputation and repeated forwards reuse it. Keyed on
# the weight's id, checked against a weak reference to it: a dropped layer drops its copy.
_weight_cache: dict[int, tuple[weakref.ref, int, tuple[Tensor, Tensor, Tensor]]] = {}


def _cached(weight: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    entry = _weight_cache.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        return None
    return entry[2]


def _cast_weight(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(w8, w8 transposed, 1 / scale): the forward GEMM reads w8, the input-gradient GEMM its
    transpose."""
    history = _delayed.history(weight, "weight")
    if history is None:  # current scaling: the copy depends on the weight alone
        hit = _cached(weight)
        if hit is not None:
            return hit
    casts = cast(weight, E4M3, history, transpose=True)
    if history is None:
        key = id(weight)
        if key not in _weight_cache:
            weakref.finalize(weight, _weight_cache.pop, key, None)
        _weight_cache[key] = (weakref.ref(weight), weight._version, casts)
    return casts


def cached_weight(weight: Tensor) -> Tensor | None:
    """The fp8 copy cached for this version of `weight` (None: none yet)."""
    hit = _cached(weight)
    return None if hit is None else hit[0]  # (the transposed copy beside it: hit[1])


def clear_weight_cache() -> None:
    """Drop every cached fp8 weight copy."""
    _weight_cache.clear()


def _check_device(t: Tensor) -> None:
    if t.is_cuda and torch.cuda.get_device_capability(t.device) < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(t.device)
        raise RuntimeError(f"mixprec fp8 rule: {name} has no fp8 tensor cores; fp8 matrix products need "
                           f"compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer "
                           "(Ada, Hopper); keep linear at 'lower' on this GPU")


def scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """(a @ b) * scale_a * scale_b in out_dtype, a and b fp8: torch._scaled_mm on CUDA. On the
    CPU the fp8 values are widened to fp32 (exactly) and multiplied by torch.mm, since torch's CPU
    _scaled_mm (2.13+) is a scalar reference loop, some 10^3 times slower (88 ms for a 512 x 64 x
    256 product): it equals _scaled_mm up to fp32 summation order (tests/test_fp8.py)."""
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return (torch.mm(a.float(), b.float()) * (scale_a * scale_b)).to(out_dtype)


# The fp8 linear's forward and backward, written once. torch._scaled_mm(a, b) takes a row-major
# and b column-major: every GEMM reads one fp8 copy as is and the other through .t() of a
# transposed copy the cast kernel wrote in the same pass (x8_t, w8_t, g8_t), so no operand is
# copied again. Eager mode calls them through _Fp8Linear; a traced graph (torch.compile) through
# the custom ops below, opaque to the tracer, so that the weight cache, the amax histories and
# the audit are read and written when the graph runs, on the real tensors.
def _forward(x2: Tensor, weight: Tensor, out_dtype: torch.dtype,
             weight_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x2 @ weight.t() in out_dtype, and for the backward x8_t (empty unless weight_grad),
    x_inv, w8_t, w_inv)."""
    x8, x8_t, x_inv = cast(x2, E4M3, _delayed.history(weight, "input"), transpose=weight_grad)
    w8, w8_t, w_inv = _cast_weight(weight)
    out = scaled_mm(x8, w8.t(), x_inv, w_inv, out_dtype)
    if _audit.records is not None:
        _audit.records.append({"shape": f"{x2.shape[0]} x {x2.shape[1]} x {weight.shape[0]}",
                               "input": _cast_audit(x2, x8, x_inv, E4M3),
                               "weight": _cast_audit(weight, w8, w_inv, E4M3)})
    return out, x8_t, x_inv, w8_t, w_inv


def _backward(g2: Tensor, x8_t: Tensor, x_inv: Tensor, w8_t: Tensor, w_inv: Tensor, weight: Tensor,
              x_dtype: torch.dtype, input_grad: bool, weight_grad: bool) -> tuple[Tensor | None, Tensor | None]:
    """(grad of x2 in x_dtype, grad of weight in its dtype), each None where not needed."""
    g8, g8_t, g_inv = cast(g2, E5M2, _delayed.history(weight, "grad"), transpose=weight_grad)
    grad_x = grad_w = None
    if input_grad:  # (M x N) @ (N x K), straight into x's dtype (fp32 under a LayerNorm)
        grad_x = scaled_mm(g8, w8_t.t(), g_inv, w_inv, x_dtype)
    if weight_grad:  # (N x M) @ (M x K)
        grad_w = scaled_mm(g8_t, x8_t.t(), g_inv, x_inv, torch.float32).to(weight.dtype)
    return grad_x, grad_w


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, out_dtype: torch.dtype) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out, *saved = _forward(x2, weight, out_dtype, ctx.needs_input_grad[1])
        ctx.save_for_backward(*saved, weight)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_w = _backward(grad_out.reshape(-1, grad_out.shape[-1]), *ctx.saved_tensors, ctx.x_dtype,
                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return None if grad_x is None else grad_x.reshape(ctx.x_shape), grad_w, None


def _tag_compile_caches() -> None:
    """torch's compile caches key a graph on what dynamo traced (F.linear under a region), not on
    the Python beneath it (this module's fp8 linear): tag the key with this file's hash, so that a
    graph cached by another version of it is traced again instead of reused."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    tag = "mixprec-fp8-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag},{tag}" if config.cache_key_tag else tag


_tag_compile_caches()


_LIB = torch.library.Library("mixprec_fp8", "DEF")
_LIB.define("linear(Tensor input, Tensor weight, Tensor? bias, ScalarType out_dtype) -> Tensor")


@torch.library.custom_op("mixprec_fp8::forward", mutates_args=())
def _forward_op(x2: Tensor, weight: Tensor, out_dtype: torch.dtype,
                weight_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out, x8_t, x_inv, w8_t, w_inv = _forward(x2, weight, out_dtype, weight_grad)
    return out, x8_t, x_inv, w8_t.clone(), w_inv.clone()  # (the cached weight copy: an op's outputs are its own)


@_forward_op.register_fake
def _forward_fake(x2, weight, out_dtype, weight_grad):
    (m, k), n = x2.shape, weight.shape[0]
    return (x2.new_empty((m, n), dtype=out_dtype), x2.new_empty((k, m) if weight_grad else (0,), dtype=E4M3),
            x2.new_empty((), dtype=torch.float32), weight.new_empty((k, n), dtype=E4M3),
            weight.new_empty((), dtype=torch.float32))


@torch.library.custom_op("mixprec_fp8::backward", mutates_args=())
def _backward_op(g2: Tensor, x8_t: Tensor, x_inv: Tensor, w8_t: Tensor, w_inv: Tensor, weight: Tensor,
                 x_dtype: torch.dtype, input_grad: bool, weight_grad: bool) -> tuple[Tensor, Tensor]:
    grad_x, grad_w = _backward(g2, x8_t, x_inv, w8_t, w_inv, weight, x_dtype, input_grad, weight_grad)
    return (g2.new_empty(0, dtype=x_dtype) if grad_x is None else grad_x,
            weight.new_empty(0) if grad_w is None else grad_w)


@_backward_op.register_fake
def _backward_fake(g2, x8_t, x_inv, w8_t, w_inv, weight, x_dtype, input_grad, weight_grad):
    m, k = g2.shape[0], weight.shape[1]
    return (g2.new_empty((m, k) if input_grad else (0,), dtype=x_dtype),
            weight.new_empty(weight.shape if weight_grad else (0,)))


def _forward_setup(ctx, inputs, output) -> None:
    x2, weight, _, weight_grad = inputs
    ctx.save_for_backward(*output[1:], weight)
    ctx.x_dtype, ctx.weight_grad = x2.dtype, weight_grad


def _forward_grad(ctx, grad_out, *_):
    grad_x, grad_w = torch.ops.mixprec_fp8.backward(grad_out.contiguous(), *ctx.saved_tensors, ctx.x_dtype,
                                                    ctx.needs_input_grad[0], ctx.weight_grad)
    return (grad_x if ctx.needs_input_grad[0] else None, grad_w if ctx.weight_grad else None, None, None)


_forward_op.register_autograd(_forward_grad, setup_context=_forward_setup)


def _traced_linear(x: Tensor, weight: Tensor, out_dtype: torch.dtype) -> Tensor:
    out = torch.ops.mixprec_fp8.forward(x.reshape(-1, x.shape[-1]), weight, out_dtype, weight.requires_grad)[0]
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    _check_device(input)  # the rule needs fp8 support even where the filter keeps a GEMM in out_dtype
    m = input.numel() // max(1, input.shape[-1])
    if not runs_in_fp8(m, input.shape[-1], weight.shape[0], input.is_cuda):  # the filter: stay in out_dtype
        return torch.nn.functional.linear(input.to(out_dtype), weight.to(out_dtype),
                                          None if bias is None else bias.to(out_dtype))
    traced = torch.compiler.is_compiling() or is_fake(input)  # (torch 2.11's dynamo runs this on fake
    # tensors with is_compiling() False)
    out = _traced_linear(input, weight, out_dtype) if traced else _Fp8Linear.apply(input, weight, out_dtype)
    # the bias outside the fp8 product, added in out_dtype as autocast's linear adds it
    return out if bias is None else out + bias.to(out_dtype)


_LIB.impl("linear", _linear, "CompositeImplicitAutograd")


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """F.linear with fp8 operands (what the "fp8" rule runs), the output in `out_dtype`."""
    return torch.ops.mixprec_fp8.linear(input, weight, bias, out_dtype)
