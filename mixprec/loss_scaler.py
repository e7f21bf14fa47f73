"""DynamicLossScaler: the loss-scale state machine, held in device tensors.

State: scale (fp32), growth tracker and hysteresis tracker (int32), and counters (int64: overflows,
overflows at min_scale). Every step-time method only enqueues kernels; nothing reads a value back
to the host, so a training loop built on it never waits for the GPU. Reading the state
(`stats()`, `state_dict()`, `get_scale()`) does synchronise and is meant for logging/checkpoints.

With hysteresis=1, min_scale=None and max_scale=None the rule is exactly torch.amp's, except that
the scale never backs off below SCALE_FLOOR (torch.amp's halves on to subnormals and then exactly
0.0, after which the first finite step multiplies the grads by 1/0 = inf and writes NaN into every
weight). At the floor, steps keep being skipped; the scaler warns once and stats() reports it.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from mixprec import ops


def reciprocal_fp32(scale: Tensor) -> Tensor:
    """1/scale in fp32, bit-identical to scale.double().reciprocal().float(): for an fp32 scale a
    correctly rounded fp32 division (one kernel instead of three) gives the same bits, because
    rounding the fp64 quotient to fp32 can't go wrong twice (53 >= 2 * 24 + 2 bits: Figueroa)."""
    if scale.dtype == torch.float32:
        return torch.reciprocal(scale)
    return scale.double().reciprocal().float()


# The lowest scale the dynamic rule backs off to (when min_scale is None or lower). 2**-24: a power
# of two, so scaling and unscaling stay exact, far above fp32's subnormals (2**-126) so 1/scale is
# finite; and it is fp16's smallest subnormal, so at any lower scale a scaled loss of order 1 is
# already 0 in fp16: no run ever needs less. torch.amp only gets there after dozens of overflows
# in a row (40 from its default 2**16), i.e. when every step is non-finite.
SCALE_FLOOR = 2.0**-24


def _check_options(init_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
                   min_scale, max_scale, names: dict[str, str] | None = None) -> None:
    """The constructor's checks, shared with load_state_dict (`names` maps an option to the
    state_dict key that carried it, for the message). Raises TypeError/ValueError; assigns nothing."""
    def name(option: str) -> str:
        return (names or {}).get(option, option)

    def real(option: str, value: Any, optional: bool = False) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name(option)} must be a real number, got {type(value).__name__} {value!r}")

    def integral(option: str, value: Any, low: int) -> None:
        real(option, value)
        if not math.isfinite(value) or int(value) != value or value < low:
            raise ValueError(f"{name(option)} must be an integer >= {low}, got {value}")

    real("init_scale", init_scale)
    if not (init_scale > 0 and math.isfinite(init_scale)):
        raise ValueError(f"{name('init_scale')} must be a positive finite number, got {init_scale}")
    real("growth_factor", growth_factor)
    if not (growth_factor > 1.0 and math.isfinite(growth_factor)):
        raise ValueError(f"{name('growth_factor')} must be > 1.0 and finite, got {growth_factor}")
    real("backoff_factor", backoff_factor)
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"{name('backoff_factor')} must be in (0, 1), got {backoff_factor}")
    integral("growth_interval", growth_interval, 1)
    integral("hysteresis", hysteresis, 1)
    real("min_scale", min_scale, optional=True)
    real("max_scale", max_scale, optional=True)
    if min_scale is not None and not (min_scale >= 0 and math.isfinite(min_scale)):
        raise ValueError(f"{name('min_scale')} must be >= 0, got {min_scale}")
    if max_scale is not None and not max_scale >= (min_scale or 0.0):
        raise ValueError(f"{name('max_scale')} must be >= min_scale, got max_scale={max_scale}, min_scale={min_scale}")


class MinScaleOverflowError(RuntimeError):
    """Gradients overflowed although the loss scale was already at min_scale."""


class DynamicLossScaler:
    """Device-resident dynamic loss scale with torch.amp's update rule, plus hysteresis
    (back off only after `hysteresis` consecutive overflows, as in DeepSpeed/Megatron) and
    optional bounds. Tensors are created on `device`, or on first use if device is None."""

    def __init__(
        self,
        device: str | torch.device | None = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 1,
        min_scale: float | None = None,
        max_scale: float | None = None,
    ) -> None:
        _check_options(init_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
                       min_scale, max_scale)
        self.init_scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.init_growth_tracker = 0
        self.init_hysteresis_tracker = self.hysteresis
        self.init_counters = (0, 0)
        # int64[2] on the device: update() calls so far (the 1-based step numbers of messages)
        # and the length of the current run of non-finite steps, so N = updates - run + 1 costs no
        # sync and stays right when update() is replayed in a CUDA graph.
        self.init_run_counters = (0, 0)
        self.run_counters: Tensor | None = None
        self._floor_warned = False
        self.scale: Tensor | None = None
        self.growth_tracker: Tensor | None = None
        self.hysteresis_tracker: Tensor | None = None
        self.counters: Tensor | None = None
        self._min_scale_watch: _AsyncFlagWatch | None = None
        if device is not None:
            self.materialize(torch.device(device))

    # -- state ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device | None:
        return None if self.scale is None else self.scale.device

    def materialize(self, device: torch.device) -> None:
        """Create the state tensors on `device` (once)."""
        if self.scale is not None:
            return
        self.scale = torch.full((), self.init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.full((), self.init_growth_tracker, dtype=torch.int32, device=device)
        self.hysteresis_tracker = torch.full((), self.init_hysteresis_tracker, dtype=torch.int32, device=device)
        # zeros + fill_, not torch.tensor(list, device=...): that is a synchronising host copy.
        self.counters = torch.zeros(2, dtype=torch.int64, device=device)
        for i, value in enumerate(self.init_counters):
            if value:
                self.counters[i].fill_(value)
        self.run_counters = torch.zeros(2, dtype=torch.int64, device=device)
        for i, value in enumerate(self.init_run_counters):
            if value:
                self.run_counters[i].fill_(value)
        self._min_scale_watch = None

    @property
    def floor(self) -> float:
        """The lowest scale update() backs off to: min_scale, but never below SCALE_FLOOR."""
        return max(SCALE_FLOOR, self.min_scale or 0.0)

    def _require_state(self, funcname: str) -> Tensor:
        if self.scale is None:
            raise RuntimeError(
                f"DynamicLossScaler.{funcname}() called before the scale exists; scale a loss "
                "first (scale_loss / GradScaler.scale) or pass device= to the constructor"
            )
        return self.scale

    # -- step-time API (no host synchronisation) -------------------------------------------------
    def scale_loss(self, loss: Tensor) -> Tensor:
        """loss * scale (creates the state on loss's device on first use)."""
        self.materialize(loss.device)
        return loss * self.scale.to(device=loss.device, non_blocking=True)

    def inv_scale(self) -> Tensor:
        """1/scale in fp32 with the bits of torch.amp's scale.double().reciprocal().float()."""
        return reciprocal_fp32(self._require_state("inv_scale"))

    def unscale_(self, grads: Iterable[Tensor], inv_scale: Tensor | None = None) -> dict[torch.device, Tensor]:
        """Multiply grads (any devices and float dtypes) by inv_scale in place and return a fresh
        found_inf tensor per device (1.0 where an inf/NaN was seen)."""
        self._require_state("unscale_")  # raises before the first scale()
        inv_scale = self.inv_scale() if inv_scale is None else inv_scale
        per_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for g in grads:
            per_device[g.device].append(g)
        found = {}
        with torch.no_grad():
            for device, group in per_device.items():
                found[device] = torch.zeros((), dtype=torch.float32, device=device)
                # A CPU kernel reads inv_scale at once, so a copy to the CPU must have landed:
                # non_blocking there would race (torch.amp has this race, see the tests).
                local_inv = inv_scale.to(device, non_blocking=device.type != "cpu")
                ops.non_finite_check_and_unscale_(group, found[device], local_inv)
        return found

    def update(self, found_inf: Tensor) -> None:
        """Advance the state machine by one step given this step's found_inf (nonzero = overflow)."""
        scale = self._require_state("update")
        self._raise_if_overflowed_at_min_scale()
        found_inf = found_inf.to(scale.device, non_blocking=True)
        ops.update_scale_(
            scale, self.growth_tracker, self.hysteresis_tracker, self.counters, found_inf,
            self.growth_factor, self.backoff_factor, self.growth_interval, self.hysteresis,
            self.floor, math.inf if self.max_scale is None else self.max_scale,
        )
        # Count the update and the run of non-finite steps on the device (tiny kernels, no sync).
        self.run_counters.add_(1)
        self.run_counters[1].mul_(found_inf != 0)
        if scale.device.type == "cpu":  # reading CPU tensors costs no sync
            self.check_floor(stacklevel=4)
        if self.min_scale is not None:
            if self._min_scale_watch is None:
                self._min_scale_watch = _AsyncFlagWatch(self.counters[1])
            self._min_scale_watch.refresh()
            if scale.device.type == "cpu":  # free to check at once
                self._raise_if_overflowed_at_min_scale()

    def _raise_if_overflowed_at_min_scale(self) -> None:
        if self._min_scale_watch is not None and self._min_scale_watch.seen_nonzero():
            self._min_scale_watch = None
            raise MinScaleOverflowError(
                f"gradients overflowed (inf/NaN) while the loss scale was already at min_scale="
                f"{self.min_scale}: lowering the scale cannot fix this, so the model or the data "
                "produce non-finite values. Check the loss and inputs for NaN/inf, lower the "
                "learning rate, or train in bf16. (The step was skipped; parameters are untouched.)"
            )

    # -- reading and checkpoints (these synchronise) ----------------------------------------------
    def floor_state(self) -> tuple[bool, int | None]:
        """(scale at the floor, first step of the current run of non-finite steps or None).
        Reads two device scalars: call it only where the host already waits (see check_floor)."""
        if self.scale is None:
            return False, None
        updates, run = self.run_counters.tolist()
        since = updates - run + 1 if run > 0 else None
        return float(self.scale.item()) <= self.floor, since

    def check_floor(self, stacklevel: int = 2) -> None:
        """Warn once if non-finite steps drove the scale down to SCALE_FLOOR (with min_scale=None).
        Reads the device: the CPU's update(), stats(), and GradScaler.update() after a plain
        optimizer's step already synchronised on an overflow call it; the fused loop never."""
        # A min_scale of the user's has its own, louder signal: MinScaleOverflowError.
        if self._floor_warned or self.min_scale is not None:
            return
        at_floor, since = self.floor_state()
        if at_floor and since is not None:
            self._floor_warned = True
            warnings.warn(
                f"the loss scale reached its floor {self.floor:g}: every step non-finite since step "
                f"{since} (inf/NaN in the gradients at every scale, so lowering it cannot help). "
                "These steps are skipped and the weights are untouched; check the loss and inputs "
                "for NaN/inf, lower the learning rate, or train in bf16.",
                UserWarning, stacklevel=stacklevel)

    def get_scale(self) -> float:
        return self.init_scale if self.scale is None else float(self.scale.item())

    def get_growth_tracker(self) -> int:
        return self.init_growth_tracker if self.growth_tracker is None else int(self.growth_tracker.item())

    def stats(self) -> dict[str, Any]:
        """Scale, trackers and counters as Python numbers (synchronises: for logging), and whether
        the scale sits at its floor with the step since which every step was non-finite."""
        counters = self.init_counters if self.counters is None else tuple(self.counters.tolist())
        self.check_floor(stacklevel=3)
        at_floor, since = self.floor_state()
        return {
            "scale": self.get_scale(),
            "growth_tracker": self.get_growth_tracker(),
            "hysteresis_tracker": self.init_hysteresis_tracker
            if self.hysteresis_tracker is None else int(self.hysteresis_tracker.item()),
            "skipped_steps": int(counters[0]),
            "overflows_at_min_scale": int(counters[1]),
            "scale_at_floor": at_floor,
            "nonfinite_since_step": since,
        }

    def state_dict(self) -> dict[str, Any]:
        stats = self.stats()
        return {
            "scale": stats["scale"],
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": stats["growth_tracker"],
            "hysteresis": self.hysteresis,
            "_hysteresis_tracker": stats["hysteresis_tracker"],
            "min_scale": self.min_scale,
            "max_scale": self.max_scale,
            "skipped_steps": stats["skipped_steps"],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads ours or torch.amp.GradScaler's (whose keys are a subset: ours are optional).
        Atomic: every value is checked as the constructor checks it before anything changes."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        required = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise KeyError(f"loss-scaler state_dict is missing {missing}; got keys {sorted(state_dict)}")
        scale = state_dict["scale"]
        if isinstance(scale, Tensor) and scale.numel() == 1:  # what torch's fill_ would accept
            scale = scale.item()
        hysteresis = state_dict.get("hysteresis", self.hysteresis)
        min_scale = state_dict.get("min_scale", self.min_scale)
        max_scale = state_dict.get("max_scale", self.max_scale)
        _check_options(scale, state_dict["growth_factor"], state_dict["backoff_factor"],
                       state_dict["growth_interval"], hysteresis, min_scale, max_scale,
                       names={k: f"state_dict[{k!r}]" for k in (
                           "growth_factor", "backoff_factor", "growth_interval", "hysteresis",
                           "min_scale", "max_scale")} | {"init_scale": "state_dict['scale']"})
        growth_tracker = state_dict["_growth_tracker"]
        hysteresis_tracker = state_dict.get("_hysteresis_tracker", hysteresis)
        skipped = state_dict.get("skipped_steps", 0)
        for key, value, high in (("_growth_tracker", growth_tracker, 2**31 - 1),
                                 ("_hysteresis_tracker", hysteresis_tracker, int(hysteresis)),
                                 ("skipped_steps", skipped, 2**63 - 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= high:
                raise ValueError(f"state_dict[{key!r}] must be an integer in [0, {high}], got {value!r}")
        # Everything checked: assign.
        self.init_scale = float(scale)
        self.growth_factor = float(state_dict["growth_factor"])
        self.backoff_factor = float(state_dict["backoff_factor"])
        self.growth_interval = int(state_dict["growth_interval"])
        self.init_growth_tracker = int(growth_tracker)
        self.hysteresis = int(hysteresis)
        self.init_hysteresis_tracker = int(hysteresis_tracker)
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.init_counters = (int(skipped), 0)
        # Step numbers go on counting; the run of non-finite steps starts afresh.
        self.init_run_counters = (self.init_run_counters[0], 0)
        if self.scale is not None:
            self.scale.fill_(self.init_scale)
            self.growth_tracker.fill_(self.init_growth_tracker)
            self.hysteresis_tracker.fill_(self.init_hysteresis_tracker)
            self.counters.zero_()
            self.counters[0].fill_(self.init_counters[0])
            self.run_counters[1].zero_()
            self._min_scale_watch = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickle plain numbers, not device tensors, like torch.amp.GradScaler.
        state = self.__dict__.copy()
        if self.scale is not None:
            stats = self.stats()
            state["init_scale"] = stats["scale"]
            state["init_growth_tracker"] = stats["growth_tracker"]
            state["init_hysteresis_tracker"] = stats["hysteresis_tracker"]
            state["init_counters"] = (stats["skipped_steps"], stats["overflows_at_min_scale"])
            state["init_run_counters"] = tuple(self.run_counters.tolist())
        for key in ("scale", "growth_tracker", "hysteresis_tracker", "counters", "run_counters",
                    "_min_scale_watch"):
            state[key] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickles from before the floor existed lack its bookkeeping: start it afresh.
        for key, value in (("init_run_counters", (0, 0)), ("run_counters", None),
                           ("_floor_warned", False)):
            state.setdefault(key, value)
        self.__dict__.update(state)


class _AsyncFlagWatch:
    """Watches a 0-dim device counter without synchronising: each refresh() starts a
    non-blocking copy into pinned host memory; seen_nonzero() looks only at copies that have
    already landed. So an error is raised one or two steps late, but the loop never waits."""

    def __init__(self, counter: Tensor) -> None:
        self.counter = counter
        self.start = int(counter.item())  # once, at first use: overflows before the watch began
        self.on_cuda = counter.device.type == "cuda"
        self.host = torch.zeros((), dtype=counter.dtype, pin_memory=self.on_cuda)
        self.event = torch.cuda.Event() if self.on_cuda else None

    def refresh(self) -> None:
        if self.on_cuda and not self.event.query():
            return  # the previous copy is still in flight; keep it
        self.host.copy_(self.counter, non_blocking=True)
        if self.on_cuda:
            self.event.record()

    def seen_nonzero(self) -> bool:
        if self.on_cuda and not self.event.query():
            return False
        return int(self.host) > self.start
