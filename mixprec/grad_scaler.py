"""mixprec.GradScaler: a drop-in for torch.amp.GradScaler on mixprec's kernels.

Same constructor (plus keyword-only extras), methods, per-optimizer state machine
(READY -> UNSCALED -> STEPPED, reset by update()), exceptions and state_dict keys as
torch.amp.GradScaler, so replacing one by the other changes nothing observable; it is a subclass
of torch's (isinstance holds) that inherits none of its code (see the class). The scale state
lives in a DynamicLossScaler (device tensors). Like torch, step() must read found_inf on the host
to decide whether to call a plain optimizer's step(); optimizers that declare
`_step_supports_amp_scaling` (torch's fused Adam/AdamW/SGD, mixprec.optim) receive grad_scale and
found_inf as device tensors instead, and then nothing synchronises. clip_grad_norm_ hands
clipping to optimizers that fold it into their step through mixprec.clipping's public protocol.
"""
from __future__ import annotations

import inspect
import warnings
from collections import abc, defaultdict
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from mixprec.clipping import FoldsClip, clip_folded_, is_pow2, needs_unscaled_grads
from mixprec.distributed import agree_found_inf, local, shard_group
from mixprec.loss_scaler import DynamicLossScaler


class OptState(Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _refresh_per_optimizer_state() -> dict[str, Any]:
    # Module-level (not a lambda) so a GradScaler stays picklable.
    # "deferred_unscale": clip_grad_norm_ on a FoldsClip optimizer (mixprec.clipping) measured the
    # scaled grads and left them scaled; the optimizer's step unscales them in its kernel.
    return {"stage": OptState.READY, "found_inf_per_device": {}, "deferred_unscale": False}


class _PerDeviceCopies:
    """Copies of one tensor, made lazily per device (non-blocking) and cached."""

    def __init__(self, master: Tensor) -> None:
        self.master = master
        self.per_device: dict[torch.device, Tensor] = {}

    def get(self, device: torch.device) -> Tensor:
        if device not in self.per_device:
            self.per_device[device] = self.master.to(device=device, non_blocking=True, copy=True)
        return self.per_device[device]


def _params_with_grad(optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


class GradScaler(torch.amp.GradScaler):
    """Drop-in replacement for ``torch.amp.GradScaler``.

    A subclass of it, so that code checking ``isinstance(scaler, torch.amp.GradScaler)`` (user
    code, framework plugins) accepts ours; but none of torch's code runs: every method and
    attribute torch's class defines, public or private (``_unscale_grads_``, ``_maybe_opt_step``,
    ``_check_scale_growth_tracker``, ``_lazy_init_scale_growth_tracker``, ...), is overridden
    here with torch's signature, and ``__init__`` does not call torch's (the state lives in a
    DynamicLossScaler, not in torch's attributes), so a method torch adds later fails loudly
    (AttributeError) instead of silently running on state we don't keep. tests/test_grad_scaler.py
    checks that no method of torch's class is inherited.

    Extra keyword-only options (torch's behaviour with their defaults): ``hysteresis`` (back off
    only after that many consecutive overflows), ``min_scale`` (an overflow at this scale raises
    MinScaleOverflowError, a step or two later on CUDA, without synchronising; without it the
    scale still never backs off below mixprec.loss_scaler.SCALE_FLOOR = 2**-24, where torch's
    reaches 0.0 and then writes NaN into the weights: see stats()), ``max_scale`` and
    ``process_group`` (for sharded grads: the group every rank agrees found_inf and the clip norm
    over; by default the device mesh of FSDP2's DTensor grads, so FSDP2 needs no argument) and
    ``skip_on_host``: see step().
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        hysteresis: int = 1,
        min_scale: float | None = None,
        max_scale: float | None = None,
        process_group: Any = None,
        skip_on_host: bool = False,
    ) -> None:
        self._device = device
        # Read found_inf on the host in step() and leave an overflowing step uncalled, as
        # torch.amp does for plain optimizers (see step()).
        self._skip_on_host = skip_on_host
        # Sharded grads: found_inf and the clip norm are agreed over this group (default: the
        # mesh of FSDP2's DTensor grads; replicated grads need nothing), like ShardedGradScaler.
        self._process_group = process_group
        self._enabled = enabled
        if self._device == "cuda" and enabled and not torch.cuda.is_available():
            warnings.warn(
                "torch.cuda.amp.GradScaler is enabled, but CUDA is not available.  Disabling.",
                stacklevel=2,
            )
            self._enabled = False
        if self._enabled:
            # torch raises AssertionError for these; a drop-in raises the same.
            if growth_factor <= 1.0:
                raise AssertionError("The growth factor must be > 1.0.")
            if backoff_factor >= 1.0:
                raise AssertionError("The backoff factor must be < 1.0.")
            self._scaler = DynamicLossScaler(
                None, init_scale, growth_factor, backoff_factor, growth_interval,
                hysteresis=hysteresis, min_scale=min_scale, max_scale=max_scale,
            )
            self._per_optimizer_states: dict[int, dict[str, Any]] = defaultdict(
                _refresh_per_optimizer_state
            )
            # Whether the scale is known, on the host, to be a power of two: then clip_grad_norm_
            # can take torch's norm bit for bit from the scaled grads (mixprec.clipping.measure).
            # Kept by every method that sets the scale, so reading it costs no sync.
            self._scale_is_pow2 = is_pow2(init_scale)

    # torch's private attribute names, for code that peeks at them (e.g. `scaler._scale`).
    @property
    def _scale(self) -> Tensor | None:
        return self._scaler.scale

    @property
    def _growth_tracker(self) -> Tensor | None:
        return self._scaler.growth_tracker

    # torch's other instance attributes, read-only views of the one state we keep (setting them
    # would change nothing: AttributeError says so; use the set_* methods).
    @property
    def _init_scale(self) -> float:
        return self._scaler.init_scale

    @property
    def _init_growth_tracker(self) -> int:
        return self._scaler.init_growth_tracker

    @property
    def _growth_factor(self) -> float:
        return self._scaler.growth_factor

    @property
    def _backoff_factor(self) -> float:
        return self._scaler.backoff_factor

    @property
    def _growth_interval(self) -> int:
        return self._scaler.growth_interval

    @property
    def loss_scaler(self) -> DynamicLossScaler:
        """The device-resident state machine behind this facade."""
        return self._scaler

    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        # torch's hook for creating the state on first use (ShardedGradScaler and others call it).
        if self._scaler.scale is not None:
            raise AssertionError("_growth_tracker initialized before _scale")
        self._scaler.materialize(torch.device(dev))

    def _check_scale_growth_tracker(self, funcname: str) -> tuple[Tensor, Tensor]:
        fix = "This may indicate your script did not use scaler.scale(loss or outputs) earlier in the iteration."
        if self._scale is None:
            raise AssertionError(f"Attempted {funcname} but _scale is None.  " + fix)
        return self._scale, self._growth_tracker

    def scale(self, outputs):
        """Multiply a tensor, or (nested) lists/tuples/iterables of tensors, by the scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            return self._scaler.scale_loss(outputs)
        copies: list[_PerDeviceCopies] = []

        def apply_scale(val):
            if isinstance(val, Tensor):
                if not copies:
                    self._scaler.materialize(val.device)
                    copies.append(_PerDeviceCopies(self._scale))
                return val * copies[0].get(val.device)
            if isinstance(val, abc.Iterable):
                scaled = map(apply_scale, val)
                return type(val)(scaled) if isinstance(val, (list, tuple)) else scaled
            raise ValueError("outputs must be a Tensor or an iterable of Tensors")

        return apply_scale(outputs)

    def _unscale_grads_(self, optimizer, inv_scale: Tensor, found_inf: Tensor | None, allow_fp16: bool
                        ) -> dict[torch.device, Tensor]:
        """Unscale every grad of `optimizer` in place; one fresh found_inf tensor per device.
        torch's signature: its `found_inf` is a zero template every caller builds, unused here."""
        grads: list[Tensor] = []
        originals: list[Tensor] = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if not isinstance(param, Tensor):
                        raise AssertionError(f"expected param to be torch.Tensor, got {type(param).__name__}")  # noqa: TRY004 (torch's type)
                    if param.grad is None:
                        continue
                    if not allow_fp16 and param.grad.dtype == torch.float16:
                        raise ValueError("Attempting to unscale FP16 gradients.")
                    if param.grad.is_sparse:
                        # Duplicate indices of a sparse grad are summed on coalesce(); in fp16
                        # that sum may overflow, so check the coalesced values (as torch does).
                        if param.grad.dtype is torch.float16:
                            param.grad = param.grad.coalesce()
                        grads.append(param.grad._values())
                    else:
                        originals.append(param.grad)
                        grads.append(local(param.grad))  # FSDP2: this rank's shard
            found = self._scaler.unscale_(grads, inv_scale)
            # Shards: an overflow in one rank's shard must skip the step on every rank.
            agree_found_inf(found, shard_group(originals, self._process_group))
            return found

    def unscale_(self, optimizer) -> None:
        """Divide `optimizer`'s grads by the scale (in place), once per iteration, e.g. before
        clipping. Records whether they held inf/NaN for step()."""
        if not self._enabled:
            return
        self._check_scale_growth_tracker("unscale_")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        elif optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        inv_scale = self._scaler.inv_scale()
        optimizer_state["found_inf_per_device"] = self._unscale_grads_(optimizer, inv_scale, None, False)
        optimizer_state["stage"] = OptState.UNSCALED

    def clip_grad_norm_(self, optimizer, max_norm: float, norm_type: float = 2.0, *, exact: bool = True) -> Tensor:
        """Clip `optimizer`'s gradients to total norm `max_norm` and return the total norm of the
        unscaled grads (a device tensor), as unscale_(optimizer) followed by
        torch.nn.utils.clip_grad_norm_ would. An optimizer that folds clipping into its step
        (mixprec.clipping.FoldsClip, e.g. mixprec.optim) gets the norm and the inf check from one
        read of the scaled grads; unscaling and clipping then happen inside its step(), so the
        grads are never rewritten; the norm is torch's bit for bit (see mixprec.clipping.measure
        for the range), and where that needs unscaled grads (a scale that is not a power of two,
        norm types other than 1, 2, inf: clipping.needs_unscaled_grads) they are unscaled in
        place first, as torch's recipe does.
        Other optimizers get exactly unscale_ + clip_grad_norm_. exact=False (folding optimizers):
        the norm from our one-read kernel instead, within a few fp32 ulps of torch's, never
        unscaling in place first (mixprec.clipping.measure)."""
        folds = isinstance(optimizer, FoldsClip)
        if not self._enabled:
            if folds:
                return clip_folded_(optimizer, max_norm, norm_type, process_group=self._process_group,
                                    exact=exact).total_norm
            return torch.nn.utils.clip_grad_norm_(_params_with_grad(optimizer), max_norm, norm_type)
        self._check_scale_growth_tracker("clip_grad_norm_")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("clip_grad_norm_() is being called after step().")
        if optimizer_state["deferred_unscale"]:
            raise RuntimeError("clip_grad_norm_() has already been called on this optimizer since the last update().")
        if not folds:
            if optimizer_state["stage"] is OptState.READY:
                self.unscale_(optimizer)
            return torch.nn.utils.clip_grad_norm_(_params_with_grad(optimizer), max_norm, norm_type)
        if exact and optimizer_state["stage"] is OptState.READY and needs_unscaled_grads(
                optimizer, norm_type, self._scale_is_pow2, self._process_group):
            # A norm of the scaled grads would differ from torch's by an ulp: unscale in place
            # first, as torch's recipe does (the clip itself stays folded into the step).
            self.unscale_(optimizer)
        if optimizer_state["stage"] is OptState.UNSCALED:  # unscale_ already ran and checked
            return clip_folded_(optimizer, max_norm, norm_type, process_group=self._process_group,
                                exact=exact).total_norm
        # The grads still carry the scale: the result's found_inf is this iteration's inf check,
        # and step() hands the optimizer grad_scale so that it unscales in its kernel.
        result = clip_folded_(optimizer, max_norm, norm_type, scale=self._scale,
                              process_group=self._process_group, exact=exact)
        optimizer_state["found_inf_per_device"] = result.found_inf
        optimizer_state["stage"] = OptState.UNSCALED
        optimizer_state["deferred_unscale"] = True
        return result.total_norm

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        # The one host read of the loop, as in torch: a plain optimizer's step() can only be
        # skipped from the host. Optimizers with _step_supports_amp_scaling never get here.
        if not sum(v.item() for v in optimizer_state["found_inf_per_device"].values()):
            return optimizer.step(*args, **kwargs)
        # Known on the host at no extra cost: update() may look at the scale's floor (nothing but
        # the scale update is queued after a skipped step, so reading it waits for nothing).
        optimizer_state["host_saw_overflow"] = True
        return None

    def step(self, optimizer, *args, **kwargs):
        """Unscale (unless unscale_ was called) and call optimizer.step() unless grads held
        inf/NaN. Returns optimizer.step()'s return value (None when skipped).

        An optimizer that declares ``_step_supports_amp_scaling`` (mixprec.optim, torch's fused
        ones) gets grad_scale and found_inf as device tensors and skips on the device: its step()
        is called even on an overflow (it initialises its state, as torch's fused optimizers do),
        and nothing synchronises. With ``GradScaler(..., skip_on_host=True)`` found_inf is read on
        the host (free on the CPU; one sync per step on CUDA, what torch.amp costs with a plain
        optimizer) and an overflowing step() is not called, so frameworks that detect a skipped
        step that way (Accelerate's optimizer_step_was_skipped, which holds back its LR
        scheduler) see it."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.STEPPED:
            # torch's exception (a drop-in raises the same), preceded by a warning naming the fix.
            self._warn_mistake("step-twice", (
                "GradScaler.step(optimizer) was called twice without update() in between: call "
                "scaler.update() once after each iteration's scaler.step() calls "
                "(mixprec.Precision.step(optimizer) does both)"))
            raise RuntimeError("step() has already been called since the last update().")

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # The optimizer unscales and skips on device: hand it grad_scale and found_inf.
            kwargs_ = kwargs
            has_grad_scaler_kwarg = "grad_scaler" in inspect.signature(optimizer.step).parameters
            if has_grad_scaler_kwarg:
                warnings.warn(
                    "GradScaler is going to stop passing itself as a keyword argument to the passed "
                    "optimizer. In the near future GradScaler registers `grad_scale: Tensor` and "
                    "`found_inf: Tensor` to the passed optimizer and let the optimizer use them directly.",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs_.update({"grad_scaler": self})
            else:
                if optimizer_state["stage"] is OptState.READY:
                    self._check_inf_per_device(optimizer)
                scale = self._scale
                # torch's sum and product, without their kernels where they change nothing: one
                # device's found_inf is the sum, and a scale times no user grad_scale is itself
                # (the optimizer only reads both).
                found_infs = [t.to(scale.device, non_blocking=True)
                              for t in optimizer_state["found_inf_per_device"].values()]
                found_inf = found_infs[0] if len(found_infs) == 1 else sum(found_infs)
                if self._skip_on_host and found_inf.item():
                    # The skip is known on the host: don't call step(), so that frameworks that
                    # detect a skip by step() not being called (Accelerate) see it. The folded
                    # clip belonged to these grads: drop it, as the step would have.
                    if isinstance(optimizer, FoldsClip):
                        optimizer.fold_clip(None)
                    optimizer_state["stage"] = OptState.STEPPED
                    optimizer_state["host_saw_overflow"] = True
                    return None
                grads_unscaled = (optimizer_state["stage"] == OptState.UNSCALED
                                  and not optimizer_state["deferred_unscale"])
                user_grad_scale = getattr(optimizer, "grad_scale", None)
                if grads_unscaled:
                    optimizer.grad_scale = user_grad_scale
                else:
                    optimizer.grad_scale = scale if user_grad_scale is None else scale * user_grad_scale
                optimizer.found_inf = found_inf
            retval = optimizer.step(*args, **kwargs_)
            optimizer_state["stage"] = OptState.STEPPED
            if not has_grad_scaler_kwarg:
                del optimizer.grad_scale
                del optimizer.found_inf
            return retval

        if optimizer_state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        if len(optimizer_state["found_inf_per_device"]) == 0:
            raise AssertionError("No inf checks were recorded for this optimizer.")
        retval = self._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)
        optimizer_state["stage"] = OptState.STEPPED
        return retval

    def update(self, new_scale: float | Tensor | None = None) -> None:
        """Back off the scale if any step this iteration overflowed, grow it after
        growth_interval clean steps; or set it to `new_scale`. Ends the iteration."""
        if not self._enabled:
            return
        scale, _ = self._check_scale_growth_tracker("update")
        if new_scale is not None:
            if isinstance(new_scale, float):
                scale.fill_(new_scale)
                self._scale_is_pow2 = is_pow2(new_scale)
            else:
                reason = (
                    "new_scale should be a float or a 1-element torch.cuda.FloatTensor or "
                    "torch.FloatTensor with requires_grad=False."
                )
                if new_scale.device.type != self._device:
                    raise AssertionError(reason)
                if new_scale.numel() != 1:
                    raise AssertionError(reason)
                if new_scale.requires_grad is True:
                    raise AssertionError(reason)
                scale.copy_(new_scale)
                self._scale_is_pow2 = False  # not known without reading the device
        else:
            found_infs = [
                found_inf.to(device=scale.device, non_blocking=True)
                for state in self._per_optimizer_states.values()
                for found_inf in state["found_inf_per_device"].values()
            ]
            if len(found_infs) == 0:
                raise AssertionError("No inf checks were recorded prior to update.")
            found_inf_combined = found_infs[0]
            for other in found_infs[1:]:
                found_inf_combined += other
            self._scaler.update(found_inf_combined)
            self._scale_is_pow2 = self._scale_is_pow2 and self._rule_keeps_pow2()
            if any(state.get("host_saw_overflow") for state in self._per_optimizer_states.values()):
                self._scaler.check_floor(stacklevel=3)  # the CPU's update() already checked
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)

    def _rule_keeps_pow2(self) -> bool:
        # update() multiplies the scale by one factor, then clamps it to [floor, max_scale]: a
        # power of two stays one when all of these are.
        s = self._scaler
        return all(is_pow2(x) for x in (s.growth_factor, s.backoff_factor, s.floor)) and (
            s.max_scale is None or s.max_scale >= 2.0**127 or is_pow2(s.max_scale))  # >=: never reached

    def _warn_mistake(self, key: str, message: str) -> None:
        """One warning per scaler and mistake, naming the fix (stacklevel: the caller of step())."""
        warned = self.__dict__.setdefault("_warned", set())
        if key not in warned:
            warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    def _get_scale_async(self) -> Tensor | None:
        return self._scale

    def get_scale(self) -> float:
        """The current scale as a Python float (synchronises)."""
        return self._scaler.get_scale() if self._enabled else 1.0

    def get_growth_factor(self) -> float:
        return self._scaler.growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        self._scaler.growth_factor = new_factor

    def get_backoff_factor(self) -> float:
        return self._scaler.backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        self._scaler.backoff_factor = new_factor

    def get_growth_interval(self) -> int:
        return self._scaler.growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        self._scaler.growth_interval = new_interval

    def _get_growth_tracker(self) -> int:
        return self._scaler.get_growth_tracker() if self._enabled else 0

    def is_enabled(self) -> bool:
        return self._enabled

    def stats(self) -> dict[str, Any]:
        """Scale, trackers, skipped-step count, and scale_at_floor / nonfinite_since_step (the
        scale backed off to its floor because every step since that one was non-finite; warns
        once). Synchronises: for logging, not every step."""
        return self._scaler.stats() if self._enabled else {}

    def state_dict(self) -> dict[str, Any]:
        """torch.amp.GradScaler's keys and values; our extra options only when they are set, so
        a default mixprec checkpoint equals torch's and either class loads the other's."""
        if not self._enabled:
            return {}
        full = self._scaler.state_dict()
        state = {k: full[k] for k in ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")}
        s = self._scaler
        if s.hysteresis != 1 or s.min_scale is not None or s.max_scale is not None:
            state.update({k: full[k] for k in ("hysteresis", "_hysteresis_tracker", "min_scale", "max_scale")})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch.amp.GradScaler's or our state_dict. Atomic: every value is checked as the
        constructor checks it (e.g. growth_interval >= 1, hysteresis >= 1, a finite scale > 0)
        before anything changes, so a refused checkpoint leaves this scaler as it was."""
        if not isinstance(state_dict, abc.Mapping):
            raise TypeError(f"state_dict must be a dict (from GradScaler.state_dict()), got "
                            f"{type(state_dict).__name__}")
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError(
                "The source state dict is empty, possibly because it was saved from a disabled "
                "instance of GradScaler."
            )
        self._scaler.load_state_dict(state_dict)
        self._scale_is_pow2 = is_pow2(self._scaler.init_scale)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_process_group"] = None  # process groups are per process: not picklable
        if self._enabled and len(self._per_optimizer_states) != 0:
            raise AssertionError(
                "A GradScaler instance may only be pickled at the beginning "
                "of an iteration, or at the end after scaler.update()."
            )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_scale_is_pow2", False)  # pickled before it existed: not known
        state.setdefault("_skip_on_host", False)
        self.__dict__.update(state)

    def _check_inf_per_device(self, optimizer) -> dict[torch.device, Tensor]:
        """Check (not unscale) grads for inf/NaN: for optimizers that unscale themselves."""
        scale, _ = self._check_scale_growth_tracker("_check_inf_per_device")
        dummy_inv_scale = torch.full((), 1.0, dtype=torch.float32, device=scale.device)
        found = self._unscale_grads_(optimizer, dummy_inv_scale, None, True)
        self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = found
        return found

    def found_inf_per_device(self, optimizer) -> dict[torch.device, Tensor]:
        """The inf/NaN flags recorded for `optimizer` this iteration (device tensors, nonzero on
        overflow; empty before unscale_/clip_grad_norm_/step and after update()). No sync."""
        state = self._per_optimizer_states.get(id(optimizer)) if self._enabled else None
        return dict(state["found_inf_per_device"]) if state else {}

    def _found_inf_per_device(self, optimizer) -> dict[torch.device, Tensor]:
        # torch.amp.GradScaler's private accessor, for code written against it.
        return self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
