"""mixprec.optim: Adam, AdamW and SGD whose step is one fused kernel pass per dtype and device.

Same constructor arguments, defaults, param groups, state_dict and LR-scheduler behaviour as
torch.optim. What is different:
- fp16/bf16 params get fp32 master weights (state["master_param"]) and fp32 moments; the kernel
  reads the low-precision grad, updates master and moments in fp32 and writes the rounded model
  weight in the same pass. fp32 params are updated in place with no copy.
- `_step_supports_amp_scaling`: a GradScaler (ours or torch.amp's) hands over grad_scale and
  found_inf as device tensors; unscaling happens in the kernel and an overflow skips the step on
  the device (params, moments and step counts untouched), so nothing synchronises. As torch's
  fused optimizers do, the same pass writes the unscaled (and clipped) gradient back to p.grad;
  `write_back_grads=False` skips that write (one gradient-sized write less per step; p.grad then
  keeps the scaled values).
- clip_grad_norm_() computes the norm (and the inf check) in one read and leaves the clipping to
  the step, instead of rewriting every gradient: the optimizers implement mixprec.clipping's
  FoldsClip protocol (fold_clip(result)), through which GradScaler and Precision hand it over.
- master_weights=False keeps no fp32 copy of fp16/bf16 params (4 bytes per param less): the update
  is computed in fp32 and written straight to the param, rounded by `rounding`:
  "nearest" (updates below half an ulp of the weight are lost: training stalls at small lr),
  "stochastic" (unbiased: rounds up with probability proportional to the distance, from a random
  stream of (seed, step, tensor, element), Philox-keyed, so runs repeat exactly and CUDA graphs
  capture it), or
  "kahan" (the rounding error is kept in a compensation buffer of the param's dtype, 2 bytes per
  param, and added back on the next step).
- Compressed state (Adam/AdamW), for fitting bigger models (`mixprec bench --fit` measures it):
  master_weights="remainder" keeps, for bf16 params, the 16 low bits bf16 drops
  (state["master_remainder"], int16): weight and remainder together are the fp32 master, so the
  masters step bit for bit as with master_weights=True at 2 bytes per param less. The weight is
  the master rounded to nearest with ties away from zero (16 bits cannot recover the master from
  a ties-to-even weight), so it differs from master_weights=True's only where the master's low 16
  bits are exactly 0x8000. moments="bf16" stores exp_avg/exp_avg_sq in bf16, stochastically
  rounded (to nearest, a second moment decaying by beta2 = 0.999 never moves); moments="8bit"
  stores them as uint8 codes of mixprec.quant's dynamic maps with one fp32 absmax per 256-element
  block (state["exp_avg_absmax"], state["exp_avg_sq_absmax"]), decoded and re-encoded inside the
  step kernel; moments="fp8" stores them as float8_e4m3fn scaled by 256 / the same absmax per
  block (see mixprec.quant), the same bytes as 8-bit with a conversion the GPU makes in one
  instruction for two values. Both block-scaled formats store a value far below its block's
  absmax as 0 (below about absmax * 2^-18 for fp8, absmax * 3e-7 for 8-bit): a second moment
  whose gradient is some 500x (fp8) or 3000x (8-bit) smaller than the largest in its block of
  256 restarts from (1 - beta2) * g^2 each step, and its update grows up to 1 / sqrt(1 - beta2).
  Checkpoints of torch.optim load into every mode (quantized on load); to_torch_state_dict()
  exports ours as torch.optim's (fp32 moments, fp32 master_param).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from mixprec import ops, quant
from mixprec.clipping import ClipResult, clip_folded_
from mixprec.distributed import local
from mixprec.loss_scaler import reciprocal_fp32
from mixprec.remainder import join_master, split_master

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SUPPORTED = (torch.float32,) + _LOW_PRECISION
# Where our kernels run: fused=True elsewhere (e.g. meta params) is refused as torch refuses it.
_FUSED_DEVICES = ("cpu", "cuda")


def _check_lr(lr: float | Tensor) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a floating-point tensor, got {lr.dtype}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {float(lr)}")


def _check_tensor_lr_for_foreach(lr: float | Tensor, foreach: bool | None, capturable: bool) -> None:
    # torch.optim.Adam's foreach path takes a Tensor lr only when capturable; torch refuses it.
    if isinstance(lr, Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")


def _check_betas(betas: tuple, foreach: bool | None, capturable: bool) -> None:
    """torch.optim.Adam's checks of the betas' types, with its messages."""
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


def _check_fused_flags(fused: bool | None, foreach: bool | None) -> None:
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, **quant.BLOCK_SCALED}


def quant_blocks(p: Tensor) -> int:
    """absmax entries of an 8-bit or fp8 moment of p: one per quant.QUANT_BLOCK elements of this
    rank's part of p (its local shard under FSDP2)."""
    return (local(p).numel() + quant.QUANT_BLOCK - 1) // quant.QUANT_BLOCK


def _check_precision_options(master_weights: bool | str, rounding: str, moments: str = "fp32",
                             amsgrad: bool = False) -> None:
    if master_weights not in (True, False, "remainder"):
        raise ValueError(f"master_weights must be True, False or 'remainder', got {master_weights!r}")
    if moments not in MOMENT_DTYPES:
        raise ValueError(f"moments must be one of {list(MOMENT_DTYPES)}, got {moments!r}")
    if moments != "fp32" and amsgrad:
        raise ValueError(f"amsgrad keeps a third fp32 moment; it is not available with moments={moments!r}")
    if (moments != "fp32" or master_weights == "remainder") and rounding == "kahan":
        raise ValueError("rounding='kahan' is not available with compressed state (moments or "
                         "master_weights='remainder'); use rounding='stochastic'")
    if rounding not in ops.ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {list(ops.ROUNDING_MODES)}, got {rounding!r}")
    if master_weights and rounding != "nearest":
        raise ValueError(
            f"rounding={rounding!r} applies to fp16/bf16 params updated without fp32 master weights; "
            "pass master_weights=False with it (master weights are written back rounded to nearest)"
        )


def _default_seed() -> int:
    # Follows torch.manual_seed, so seeded runs repeat; fits the op's int64.
    return torch.initial_seed() % (2**63)


def _ignored_torch_flags(differentiable: bool) -> None:
    if differentiable:
        raise ValueError("mixprec optimizers are not differentiable; use torch.optim with differentiable=True")


class _Batch:
    """The params of one param group that share a device and dtype: one kernel call. `params`
    key the optimizer state; `tensors` and `grads` are what the kernel updates and reads (the
    local shards of DTensors, e.g. under FSDP2)."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.tensors: list[Tensor] = []
        self.grads: list[Tensor] = []
        # (param, contiguous copy) of params that are not dense (strided views): the kernel
        # updates the copy, step() writes it back.
        self.write_back: list[tuple[Tensor, Tensor]] = []
        # (grad, copy) of grads whose strides differ from their param's: written back when the
        # kernel wrote the unscaled gradient into the copy.
        self.grad_write_back: list[tuple[Tensor, Tensor]] = []


class FusedOptimizer(torch.optim.Optimizer):
    """Shared machinery: validation, batching by (device, dtype), grad scaling and clipping
    handed to the kernel, master weights, and torch-compatible checkpoints."""

    _step_supports_amp_scaling = True
    _fp32_state_keys: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict[str, Any], write_back_grads: bool = True) -> None:
        # What fold_clip() handed over for the next step (mixprec.clipping's rules).
        self._clip_result: ClipResult | None = None
        if not isinstance(write_back_grads, bool):
            raise TypeError(f"write_back_grads must be a bool, got {write_back_grads!r}")
        self.write_back_grads = write_back_grads
        super().__init__(params, defaults)

    # -- validation ------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = type(self).__name__
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(
                    f"{name}: param {i} of group {len(self.param_groups) - 1} is complex ({p.dtype}); "
                    "mixprec's fused optimizers take float32, float16 or bfloat16 params (use torch.optim "
                    "for complex ones)"
                )
            if p.dtype not in _SUPPORTED:
                raise ValueError(
                    f"{name}: param {i} of group {len(self.param_groups) - 1} is {p.dtype}; expected "
                    "float32, float16 or bfloat16"
                )
        self._check_one_device(group, len(self.param_groups) - 1)

    def _check_one_device(self, group: dict[str, Any], index: int) -> None:
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(
                f"{type(self).__name__}: param group {index} has params on different devices "
                f"{sorted(str(d) for d in devices)}; put each device's params in its own param group"
            )

    def _collect(self, only: Tensor | None = None) -> list[tuple[dict[str, Any], list[_Batch]]]:
        """Every (group, batches) to update (or only the param `only`), validated before anything
        is modified."""
        name = type(self).__name__
        work = []
        for index, group in enumerate(self.param_groups):
            if only is not None and not any(q is only for q in group["params"]):
                continue
            self._check_one_device(group, index)
            batches: dict[tuple[torch.device, torch.dtype], _Batch] = defaultdict(_Batch)
            for param in group["params"] if only is None else [only]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse or param.grad.layout != torch.strided:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                p, g = local(param), local(param.grad)
                if g.dtype != p.dtype or g.shape != p.shape:
                    raise RuntimeError(
                        f"{name}: a grad of dtype {g.dtype} and shape {tuple(g.shape)} belongs to a "
                        f"param of dtype {p.dtype} and shape {tuple(p.shape)}"
                    )
                if group["fused"] and (p.device.type not in _FUSED_DEVICES or not p.is_floating_point()):
                    raise RuntimeError(  # torch's message, raised by torch at the step too
                        "`fused=True` requires all the params to be floating point Tensors of supported "
                        f"devices: {list(_FUSED_DEVICES)} but {p.dtype} and {p.device.type}"
                    )
                batch = batches[(p.device, p.dtype)]
                if not p.is_contiguous() and not _is_dense(p):
                    copy = p.contiguous()  # the kernel needs dense memory; step() writes it back
                    batch.write_back.append((p, copy))
                    p = copy
                if g.stride() != p.stride():
                    copy = torch.empty_like(p).copy_(g)  # the kernel walks param and grad in step
                    batch.grad_write_back.append((g, copy))
                    g = copy
                batch.params.append(param)
                batch.tensors.append(p)
                batch.grads.append(g)
            work.append((group, list(batches.values())))
        return work

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One fused update of every param with a grad. Reads `grad_scale` / `found_inf` set by a
        GradScaler and the ClipResult handed over by fold_clip() (then drops it)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_work(self._collect())
        return loss

    @torch.no_grad()
    def step_param(self, param: Tensor) -> None:
        """Step one param alone (it must be in a param group), as step() would step it: what
        mixprec.optim.step_in_backward calls as each grad is accumulated."""
        self._step_work(self._collect(only=param))

    def _step_work(self, work: list[tuple[dict[str, Any], list[_Batch]]]) -> None:
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        clip = self._clip_result
        if grad_scale is None:
            inv_scale = None
        else:
            inv_scale = reciprocal_fp32(grad_scale) if clip is None else clip.inv_scale_for(grad_scale)
        # torch's fused optimizers leave p.grad unscaled (and torch's recipe leaves it clipped).
        store_grads = self.write_back_grads and (grad_scale is not None or clip is not None)
        per_device: dict[tuple[str, torch.device], Tensor | None] = {}

        def on(device: torch.device, key: str, t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if (key, device) not in per_device:
                per_device[(key, device)] = t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
            return per_device[(key, device)]

        for group, batches in work:
            for batch in batches:
                device = batch.tensors[0].device
                for p in batch.params:
                    self._init_state(p, group)
                lr = group["lr"]
                if isinstance(lr, Tensor):  # per group: not shared through `on`'s cache
                    lr = lr.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
                self._update(
                    group, batch, lr=lr,
                    inv_scale=on(device, "inv_scale", inv_scale),
                    clip_coef=None if clip is None else clip.clip_coef.get(device),
                    found_inf=on(device, "found_inf", found_inf), store_grads=store_grads,
                )
                for param, copy in batch.write_back:
                    param.copy_(copy)
                if store_grads:
                    for grad, copy in batch.grad_write_back:
                        grad.copy_(copy)
        self._clip_result = None

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        # No entry for a param that keeps no state (SGD without momentum), as in torch.
        state = self.state.get(p, {})
        if "step" not in state and self._needs_step(p, group):
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in self._fp32_state_keys_for(group):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        self._init_weight_state(p, group, state)
        if state:
            self.state[p] = state

    def _init_weight_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """fp16/bf16 params: the fp32 master copy, or the Kahan compensation buffer."""
        if p.dtype not in _LOW_PRECISION:
            return
        if group.get("master_weights", True) == "remainder" and p.dtype == torch.bfloat16:
            if "master_param" in state:  # from a master_weights=True checkpoint: split it exactly
                weight, state["master_remainder"] = split_master(state.pop("master_param").to(p.device))
                p.detach().copy_(weight)
            elif "master_remainder" not in state:  # the weight alone is the master
                state["master_remainder"] = torch.zeros_like(p, dtype=torch.int16, memory_format=torch.contiguous_format)
            return
        if group.get("master_weights", True):
            if "master_remainder" in state:  # from a remainder checkpoint: join weight and remainder
                state["master_param"] = join_master(p.detach(), state.pop("master_remainder"))
            if "master_param" not in state:
                state["master_param"] = torch.empty_like(p, dtype=torch.float32).copy_(p.detach())
        elif group.get("rounding") == "kahan" and "compensation" not in state:
            state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _needs_step(self, p: Tensor, group: dict[str, Any]) -> bool:
        return True

    def _fp32_state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._fp32_state_keys

    def _masters(self, batch: _Batch, group: dict[str, Any]) -> list[Tensor]:
        master = group.get("master_weights", True)
        if batch.params[0].dtype not in _LOW_PRECISION or not master or master == "remainder":
            return []
        return [local(self.state[p]["master_param"]) for p in batch.params]

    def _states(self, batch: _Batch, key: str) -> list[Tensor]:
        """One state tensor per param of the batch, as the kernel sees it (local shards)."""
        return [local(self.state[p][key]) for p in batch.params]

    def _weight_kwargs(self, batch: _Batch, group: dict[str, Any]) -> dict[str, Any]:
        """The op arguments that say how the weights are stored and rounded."""
        direct = batch.params[0].dtype in _LOW_PRECISION and not group.get("master_weights", True)
        rounding = group.get("rounding", "nearest") if direct else "nearest"
        return {
            "master_params": self._masters(batch, group),
            "compensations": self._states(batch, "compensation") if rounding == "kahan" else [],
            "rounding": rounding,
            "seed": group.get("seed", 0),
        }

    def _update(self, group, batch: _Batch, **scalars) -> None:
        raise NotImplementedError

    # -- clipping (mixprec.clipping's FoldsClip protocol) ---------------------------------------------
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, process_group: Any = None, *,
                        exact: bool = True) -> Tensor:
        """Like torch.nn.utils.clip_grad_norm_ over this optimizer's params: returns the total
        norm (a device tensor). The grads are not rewritten: the next step() applies the clip
        coefficient inside its kernel. Sharded grads (FSDP2 DTensors, or `process_group` given)
        are clipped by the global norm, agreed with one all-reduce. exact=False: our one-read
        norm kernel instead of torch's norm ops (mixprec.clipping.measure)."""
        return clip_folded_(self, max_norm, norm_type, process_group=process_group, exact=exact).total_norm

    def fold_clip(self, result: ClipResult) -> None:
        """Apply `result` (from mixprec.clipping.measure over this optimizer's grads) in the next
        step(): its clip coefficient, and its 1/scale when that step unscales by the same scale."""
        self._clip_result = result

    def zero_grad(self, set_to_none: bool = True) -> None:
        # a clip coefficient belongs to the grads it was computed from
        self._clip_result = None
        super().zero_grad(set_to_none)

    # -- checkpoints -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads ours or torch.optim's (fp32 state is kept fp32 even for fp16/bf16 params; missing
        master weights are made from the params; a Python-number step becomes our fp32 step
        tensor). Checked before anything changes."""
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if len(saved_ids) == len(params):  # otherwise torch's own check raises below
            saved_group_of = {i: g for g in state_dict["param_groups"] for i in g["params"]}
            for saved_id, p in zip(saved_ids, params):
                saved = state_dict["state"].get(saved_id)
                if saved:
                    self._check_loaded_state(saved_id, saved, p, {**self.defaults, **saved_group_of[saved_id]})
        super().load_state_dict(state_dict)
        # torch casts state to the param's dtype; re-read the checkpoint's values in fp32 (the
        # compensation buffer alone is in the param's dtype).
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if key == "step":
                    step = value.detach().reshape(()) if isinstance(value, Tensor) else torch.tensor(float(value))
                    state[key] = step.to(device=p.device, dtype=torch.float32, copy=True)
                elif isinstance(value, Tensor):
                    state[key] = value.detach().to(device=p.device, dtype=_loaded_dtype(key, value, p), copy=True)
            self._complete_loaded_state(p, group_of[id(p)], state)

    def _check_loaded_state(self, saved_id: Any, saved: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        """Refuse a checkpoint's state for one param that the next step could not use: missing
        keys (KeyError, as torch raises at that step), values of the wrong type or shape."""
        where = f"{type(self).__name__}.load_state_dict: state['{{}}'] of param {saved_id}"
        for key in self._required_state_keys(group):
            if key not in saved:
                raise KeyError(f"{where.format(key)} is missing (a checkpoint of another optimizer or options?)")
        for key, value in saved.items():
            if key == "step":
                is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
                is_count = isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool
                if not (is_number or is_count and not value.is_complex()):
                    raise ValueError(f"{where.format(key)} must be a number or a 1-element real tensor, got {value!r}")
            elif key in self._tensor_state_keys:
                if value is None and key in self._optional_state_keys:
                    continue
                if not isinstance(value, Tensor):
                    raise TypeError(f"{where.format(key)} must be a Tensor, got {type(value).__name__}")
                if value.shape != p.shape:
                    raise ValueError(
                        f"{where.format(key)} has shape {tuple(value.shape)} but the param has shape "
                        f"{tuple(p.shape)}; the checkpoint belongs to a different model"
                    )

    # The state keys our optimizers keep as tensors of the param's shape; None is allowed for the
    # optional ones (torch's SGD saves momentum_buffer=None before its first step).
    _tensor_state_keys = frozenset(
        {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "master_param", "compensation",
         "master_remainder"})
    _optional_state_keys = frozenset({"momentum_buffer"})

    def _required_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Groups loaded from torch.optim checkpoints lack our options (master_weights, rounding,
        # seed, ...): give them this optimizer's defaults, as torch's optimizers do for theirs.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _complete_loaded_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        self._init_weight_state(p, group, state)


def _loaded_dtype(key: str, value: Tensor, p: Tensor) -> torch.dtype:
    """The dtype a checkpoint's state tensor is loaded in: the compensation in the param's dtype,
    codes (8-bit, fp8) and int16 remainders as saved, every other float (bf16 moments included)
    in fp32; _complete_loaded_state then converts the moments to the group's `moments`."""
    if key == "compensation":
        return p.dtype
    if value.dtype in (torch.uint8, torch.float8_e4m3fn, torch.int16):
        return value.dtype
    return torch.float32


def _is_dense(t: Tensor) -> bool:
    # Same test as ATen's is_non_overlapping_and_dense, via a permutation to contiguous.
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    return t.permute(order).is_contiguous()


class Adam(FusedOptimizer):
    """torch.optim.Adam's algorithm (incl. amsgrad, maximize, L2 weight decay) in one fused pass.
    Beyond torch's arguments: master_weights, rounding and seed (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool | str = True,
        rounding: str = "nearest",
        seed: int | None = None,
        write_back_grads: bool = True,
        moments: str = "fp32",
    ) -> None:
        _check_tensor_lr_for_foreach(lr, foreach, capturable)
        _check_lr(lr)
        _check_precision_options(master_weights, rounding, moments, amsgrad)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        _check_betas(betas, foreach, capturable)
        _ignored_torch_flags(differentiable)
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
            "maximize": maximize, "foreach": foreach, "capturable": capturable,
            "differentiable": differentiable, "fused": fused, "decoupled_weight_decay": decoupled_weight_decay,
            "master_weights": master_weights, "rounding": rounding,
            "seed": _default_seed() if seed is None else int(seed), "moments": moments,
        }
        super().__init__(params, defaults, write_back_grads)
        _check_fused_flags(fused, foreach)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_precision_options(group.get("master_weights", True), group.get("rounding", "nearest"),
                                 group.get("moments", "fp32"), group.get("amsgrad", False))
        if group.get("master_weights") == "remainder":
            for i, p in enumerate(group["params"]):
                if p.dtype == torch.float16:
                    raise ValueError(
                        f"{type(self).__name__}: master_weights='remainder' needs bfloat16 params (bf16 + 16 bits "
                        f"is fp32); param {i} is float16: use master_weights=True for fp16 params")

    def _fp32_state_keys_for(self, group):
        if group.get("moments", "fp32") != "fp32":
            return ()
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        super()._init_state(p, group)
        moments = group.get("moments", "fp32")
        if moments == "fp32":
            return
        state = self.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:  # zeros_like: a DTensor param (FSDP2) gets DTensor state, sharded alike
                state[key] = torch.zeros_like(p, dtype=MOMENT_DTYPES[moments], memory_format=torch.contiguous_format)
            if moments in quant.BLOCK_SCALED and key + "_absmax" not in state:
                # One absmax per 256 elements of this rank's shard: blocks never straddle shards.
                state[key + "_absmax"] = torch.zeros(quant_blocks(p), dtype=torch.float32, device=local(p).device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As FusedOptimizer's, except that `moments` stays what this optimizer was built with
        (a storage format, not a hyperparameter): saved moments of another format are converted."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, list) and len(groups) == len(self.param_groups):
            state_dict = {**state_dict, "param_groups": [
                {**saved, "moments": ours.get("moments", "fp32")} if isinstance(saved, dict) else saved
                for saved, ours in zip(groups, self.param_groups)]}
        super().load_state_dict(state_dict)

    def _check_loaded_state(self, saved_id, saved, p, group) -> None:
        super()._check_loaded_state(saved_id, saved, p, group)
        where = f"{type(self).__name__}.load_state_dict: state['{{}}'] of param {saved_id}"
        for key in ("exp_avg", "exp_avg_sq"):
            value = saved.get(key)
            absmax = saved.get(key + "_absmax")
            if isinstance(value, Tensor) and value.dtype in quant.BLOCK_SCALED.values():
                if not isinstance(absmax, Tensor) or absmax.dtype != torch.float32 or absmax.numel() != quant_blocks(p):
                    raise ValueError(f"{where.format(key + '_absmax')} must be a float32 tensor of "
                                     f"{quant_blocks(p)} blocks beside {value.dtype} {key} codes")
                # A NaN or negative scale, or a NaN fp8 code, would reach the weights at the next step.
                if not (torch.isfinite(absmax) & (absmax >= 0)).all():
                    raise ValueError(f"{where.format(key + '_absmax')} holds inf/NaN or negative values")
                if value.dtype == torch.float8_e4m3fn:  # 8-bit codes decode to finite map entries; fp8 may not
                    if torch.isnan(value).any():
                        raise ValueError(f"{where.format(key)} holds NaN codes")
                    codes = local(value)  # this rank's shard under FSDP2, as absmax is
                    if key == "exp_avg_sq" and (codes.float() < 0).any():
                        raise ValueError(f"{where.format(key)} has negative codes; a second moment is >= 0")
                    if not torch.isfinite(quant.decode_moment(codes, absmax, signed=key == "exp_avg")).all():
                        raise ValueError(f"{where.format(key)} decodes to inf (a code times its block's "
                                         "absmax / 256 overflows fp32)")
            elif isinstance(value, Tensor) and group.get("moments") in quant.BLOCK_SCALED:
                if not torch.isfinite(value).all():
                    raise ValueError(f"{where.format(key)} holds inf/NaN, which {group['moments']} moments "
                                     "cannot store")
                if key == "exp_avg_sq" and (value < 0).any():
                    raise ValueError(f"{where.format(key)} has negative values; a second moment is >= 0")
        remainder = saved.get("master_remainder")
        if remainder is not None and (not isinstance(remainder, Tensor) or remainder.dtype != torch.int16
                                      or p.dtype != torch.bfloat16):
            raise ValueError(f"{where.format('master_remainder')} must be an int16 tensor of a bfloat16 param")

    def _complete_loaded_state(self, p, group, state) -> None:
        super()._complete_loaded_state(p, group, state)
        moments = group.get("moments", "fp32")
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            value = state.get(key)
            if value is None:
                continue
            if value.dtype in quant.BLOCK_SCALED.values():  # saved codes: keep, or decode for another format
                if value.dtype == MOMENT_DTYPES[moments]:
                    continue
                value = quant.decode_moment(value, state.pop(key + "_absmax"), signed=signed)
            if moments in quant.BLOCK_SCALED:
                state[key], state[key + "_absmax"] = quant.encode_moment(value.float(), moments, signed=signed)
            else:
                state[key] = value.to(MOMENT_DTYPES[moments])

    def _weights_storage(self, dtype: torch.dtype, group: dict[str, Any]) -> str:
        """adam_step_compressed_'s `weights` for params of `dtype` in `group`."""
        master = group.get("master_weights", True)
        if dtype not in _LOW_PRECISION:
            return "plain"
        if master == "remainder":
            return "remainder"
        if master:
            return "master"
        return "stochastic" if group.get("rounding") == "stochastic" else "plain"

    def _compressed(self, dtype: torch.dtype, group: dict[str, Any]) -> bool:
        return group.get("moments", "fp32") != "fp32" or self._weights_storage(dtype, group) == "remainder"

    def _required_state_keys(self, group):
        return ("step",) + self._fp32_state_keys_for(group)

    def _update(self, group, batch, *, lr, inv_scale, clip_coef, found_inf, store_grads) -> None:
        states = [self.state[p] for p in batch.params]
        beta1, beta2 = group["betas"]
        dtype = batch.params[0].dtype
        if self._compressed(dtype, group):
            weights, device = self._weights_storage(dtype, group), batch.tensors[0].device
            block_scaled = group["moments"] in quant.BLOCK_SCALED
            ops.adam_step_compressed_(
                batch.tensors, batch.grads, self._states(batch, "exp_avg"), self._states(batch, "exp_avg_sq"),
                self._states(batch, "exp_avg_absmax") if block_scaled else [],
                self._states(batch, "exp_avg_sq_absmax") if block_scaled else [],
                self._masters(batch, group) if weights == "master" else [],
                self._states(batch, "master_remainder") if weights == "remainder" else [],
                [s["step"] for s in states], lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], decoupled_weight_decay=group.get("decoupled_weight_decay", False),
                maximize=group["maximize"], signed_map=quant.signed_map(device),
                unsigned_map=quant.unsigned_map(device), moments=group["moments"], weights=weights,
                inv_scale=inv_scale, clip_coef=clip_coef, found_inf=found_inf, seed=group.get("seed", 0),
                store_grads=store_grads,
            )
            return
        ops.adam_step_(
            batch.tensors, batch.grads, self._states(batch, "exp_avg"), self._states(batch, "exp_avg_sq"),
            self._states(batch, "max_exp_avg_sq") if group["amsgrad"] else [],
            steps=[s["step"] for s in states], **self._weight_kwargs(batch, group),
            lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=group.get("decoupled_weight_decay", False),
            maximize=group["maximize"], inv_scale=inv_scale, clip_coef=clip_coef, found_inf=found_inf,
            store_grads=store_grads,
        )


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2) in one fused pass."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool | str = True,
        rounding: str = "nearest",
        seed: int | None = None,
        write_back_grads: bool = True,
        moments: str = "fp32",
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, master_weights=master_weights, rounding=rounding, seed=seed,
            write_back_grads=write_back_grads, moments=moments,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # An Adam checkpoint's groups say decoupled_weight_decay=False; AdamW stays AdamW, as torch's.
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class SGD(FusedOptimizer):
    """torch.optim.SGD (momentum, dampening, nesterov, weight decay, maximize) in one fused pass.
    Beyond torch's arguments: master_weights, rounding and seed (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = True,
        rounding: str = "nearest",
        seed: int | None = None,
        write_back_grads: bool = True,
    ) -> None:
        _check_lr(lr)
        _check_precision_options(master_weights, rounding)
        if master_weights == "remainder":
            raise ValueError("SGD: master_weights='remainder' is Adam/AdamW's (compressed state); use "
                             "master_weights=True, or False with rounding='stochastic'")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        _ignored_torch_flags(differentiable)
        defaults = {
            "lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
            "nesterov": nesterov, "maximize": maximize, "foreach": foreach, "differentiable": differentiable,
            "fused": fused, "master_weights": master_weights, "rounding": rounding,
            "seed": _default_seed() if seed is None else int(seed),
        }
        super().__init__(params, defaults, write_back_grads)
        _check_fused_flags(fused, foreach)

    def _fp32_state_keys_for(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _needs_step(self, p, group) -> bool:
        # torch's SGD keeps no step; ours counts steps for the momentum buffer's first step and
        # for the stochastic-rounding stream.
        stochastic = p.dtype in _LOW_PRECISION and not group["master_weights"] and group["rounding"] == "stochastic"
        return group["momentum"] != 0 or stochastic

    def _complete_loaded_state(self, p, group, state) -> None:
        super()._complete_loaded_state(p, group, state)
        if state.get("momentum_buffer") is None:
            state.pop("momentum_buffer", None)
        elif "step" not in state:  # a torch checkpoint: an existing buffer is past its first step
            state["step"] = torch.ones((), dtype=torch.float32, device=p.device)

    def _update(self, group, batch, *, lr, inv_scale, clip_coef, found_inf, store_grads) -> None:
        states = [self.state.get(p, {}) for p in batch.params]
        has_momentum = group["momentum"] != 0
        ops.sgd_step_(
            batch.tensors, batch.grads, self._states(batch, "momentum_buffer") if has_momentum else [],
            steps=[s["step"] for s in states] if "step" in states[0] else [],
            **self._weight_kwargs(batch, group),
            lr=lr, momentum=group["momentum"], dampening=group["dampening"],
            weight_decay=group["weight_decay"], nesterov=group["nesterov"],
            maximize=group["maximize"], inv_scale=inv_scale, clip_coef=clip_coef, found_inf=found_inf,
            store_grads=store_grads,
        )


def to_torch_state_dict(optimizer: Adam) -> dict[str, Any]:
    """`optimizer.state_dict()` as torch.optim.Adam/AdamW keeps it: moments in fp32 (8-bit, fp8 and
    bf16 ones decoded), no absmax; a remainder and its bf16 weight joined into an fp32 "master_param"
    (which torch ignores and our optimizers with master_weights=True load). Loads into
    torch.optim.AdamW as it is; the optimizer is not changed."""
    saved = optimizer.state_dict()
    params = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    ids = list(chain.from_iterable(g["params"] for g in saved["param_groups"]))
    by_id = dict(zip(ids, params))
    out_state = {}
    for pid, st in saved["state"].items():
        st = dict(st)
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            value = st.get(key)
            if isinstance(value, Tensor) and value.dtype in quant.BLOCK_SCALED.values():
                st[key] = quant.decode_moment(value, st.pop(key + "_absmax"), signed=signed)
            elif isinstance(value, Tensor):
                st[key] = value.float()
        if "master_remainder" in st:
            st["master_param"] = join_master(by_id[pid].detach(), st.pop("master_remainder"))
        out_state[pid] = st
    groups = [{k: v for k, v in g.items() if k not in ("master_weights", "rounding", "seed", "moments")}
              for g in saved["param_groups"]]
    return {"state": out_state, "param_groups": groups}


def step_in_backward(optimizer: FusedOptimizer) -> Callable[[], None]:
    """Step each param of `optimizer` as soon as backward has accumulated its grad, then free the
    grad (torch's register_post_accumulate_grad_hook), so the grads of the whole model never exist
    at once: a model holds its weights and optimizer state, plus one param's grad at a time.
    Call backward() only (no optimizer.step(); zero_grad is not needed). Returns a function that
    removes the hooks.

    What it gives up: anything that needs every grad before the first step. There is no global
    grad-norm clipping and no loss scaling with overflow skipping (a GradScaler would have to see
    every grad first): use it with bf16 weights or bf16-mixed, which need no loss scaling.
    Gradient accumulation over micro-batches does not apply either (each backward steps)."""
    if not isinstance(optimizer, FusedOptimizer):
        raise TypeError(f"step_in_backward takes a mixprec.optim optimizer, got {type(optimizer).__name__}")

    def hook(param: Tensor) -> None:
        optimizer.step_param(param)
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(hook) for g in optimizer.param_groups for p in g["params"]]

    def remove() -> None:
        for h in handles:
            h.remove()
    return remove
