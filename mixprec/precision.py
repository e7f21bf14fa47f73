"""mixprec.Precision: one object that puts a training loop in a precision mode.

    prec = mixprec.Precision("bf16-mixed")        # or Precision() to read $MIXPREC_PRECISION
    model, opt = prec.setup(model, opt)           # forward runs under the mode; state_dict unchanged
    prec.backward(loss); prec.clip_grad_norm_(opt, 1.0); prec.step(opt)

Modes (Lightning Fabric's strings): "32-true" (nothing changes), "64-true" (float64 model and
inputs), "16-mixed" (fp16 autocast + mixprec.GradScaler), "bf16-mixed" (bf16 autocast, no scaler),
"16-true" / "bf16-true" (fp16/bf16 weights, updated by a mixprec.optim optimizer that keeps fp32
master weights unless master_weights=False), "fp8-mixed" / "fp8-mixed-16" (Fabric's
"transformer-engine" / "transformer-engine-float16": bf16 / fp16 autocast with linear layers on
the "fp8" rule, mixprec.fp8). The mode is validated once, in parse_precision.
A set-up model returns fp32 outputs (as in Fabric) when called outside an autocast region, so
fp32 loss code runs unchanged; called inside one (`with prec.autocast(): loss_fn(model(x), y)`),
its outputs stay as autocast made them, as in the torch.amp recipe.

Mistakes it detects, each with one warning per Precision that names the fix: loss.backward()
instead of prec.backward(loss) under 16-mixed (the step then uses the unscaled grads as they
are), grads rewritten in place between prec.backward() and unscaling (e.g.
torch.nn.utils.clip_grad_norm_ on scaled grads), and fp16 where it is slow (CPU, GPUs without
tensor cores).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mixprec import hardware, ops
from mixprec import optim as mixprec_optim
from mixprec.autocast import autocast
from mixprec.clipping import FoldsClip, clip_folded_
from mixprec.distributed import agree_found_inf, local, shard_group
from mixprec.grad_scaler import GradScaler

# The precision strings live in precision_modes (no kernels needed); re-exported here.
from mixprec.precision_modes import (  # noqa: F401
    ALIASES,
    ENV_VAR,
    MODES,
    Mode,
    parse_precision,
    valid_precisions,
)
from mixprec.remainder import split_master


# -- input/output casting (as Lightning Fabric does) -------------------------------------------
def cast_floats(data: Any, dtype: torch.dtype) -> Any:
    """`data` with every floating tensor cast to `dtype`, through dicts, lists, tuples and
    namedtuples; everything else (ints, bools, index tensors) unchanged."""
    if isinstance(data, Tensor):
        return data.to(dtype) if data.is_floating_point() else data
    if isinstance(data, Mapping):
        items = {k: cast_floats(v, dtype) for k, v in data.items()}
        try:
            return type(data)(items)
        except TypeError:
            return items
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(cast_floats(v, dtype) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(cast_floats(v, dtype) for v in data)
    return data


class default_dtype(contextlib.ContextDecorator):  # a context manager: lower case, like torch's
    """Sets torch's default dtype inside the block, so tensors a forward creates (torch.zeros,
    torch.arange(...).float()) get the mode's dtype, as Fabric's true modes do."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._previous: list[torch.dtype] = []

    def __enter__(self) -> None:
        self._previous.append(torch.get_default_dtype())
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self._previous.pop())


_FLOATING_CASTS = {torch.float64: nn.Module.double, torch.float16: nn.Module.half,
                   torch.bfloat16: nn.Module.bfloat16, torch.float32: nn.Module.float}


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` (the same object) with its floating params and buffers cast to `dtype`, as
    module.double() / .half() / .bfloat16() do: complex tensors keep their dtype, where
    module.to(dtype=torch.float64) would turn complex128 into float64 (dropping the imaginary
    part). Parameters keep their identity, so optimizers built over them still hold them."""
    return _FLOATING_CASTS[dtype](module)


# -- the forward wrapper ---------------------------------------------------------------------------
class _PrecisionForward:
    """Instance attribute `forward` of a set-up module: casts inputs, runs the module's own
    forward in the mode's context, casts outputs. The module stays the same object, so its
    state_dict keys, attributes, hooks and isinstance checks are untouched; picklable and
    deep-copyable (no closures)."""

    def __init__(self, module: nn.Module, precision: Precision, inner: Any = None) -> None:
        self.module = module
        self.precision = precision
        self.inner = inner  # None: the class's forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        prec = self.precision
        # Called inside an autocast region (`with prec.autocast(): loss_fn(model(x), y)`), the
        # caller's code runs under autocast too and its policy picks the loss's dtypes, as in the
        # torch.amp recipe: outputs stay as they are (an fp32 copy of the logits would cost a
        # cast each way and their fp32 size in memory).
        caller_autocast = prec.mode.mixed and torch.is_autocast_enabled(prec.device_type)
        args, kwargs = prec.convert_input((args, kwargs))
        with prec.forward_context():
            if self.inner is None:
                out = type(self.module).forward(self.module, *args, **kwargs)
            else:
                out = self.inner(*args, **kwargs)
        return out if caller_autocast else prec.convert_output(out)


def _nonfinite_flags(grads: Iterable[Tensor]) -> dict[torch.device, Tensor]:
    """Per device, a 0-dim fp32 flag, nonzero if the grads hold inf/NaN: one read by our norm
    kernel, which only reads the grads (their versions stay, so Precision's check for grads
    edited after backward is not fooled). Sharded grads agree over their group. No sync."""
    per_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    originals = []
    for g in grads:
        if g.is_sparse:
            per_device[g.device].append(g.coalesce()._values() if g.dtype is torch.float16 else g._values())
        else:
            originals.append(g)
            per_device[local(g).device].append(local(g))
    found = {}
    for device, gs in per_device.items():
        found[device] = torch.zeros((), dtype=torch.float32, device=device)
        ops.grad_norm(gs, found[device], torch.ones((), dtype=torch.float32, device=device), math.inf)
    agree_found_inf(found, shard_group(originals))
    return found


def _any_on_host(flags: Iterable[Tensor]) -> bool:
    """Whether any flag is nonzero: one host read for all of them."""
    flags = list(flags)
    if not flags:
        return False
    first = flags[0].device
    return bool(torch.stack([f.to(first, non_blocking=True).reshape(()) for f in flags]).any().item())


def nonfinite_grad_names(named_params: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the params whose grad holds an inf or NaN. One read of every grad and one host
    sync decide whether any does; only then is each grad checked (one more sync), for the names."""
    named = [(n, p.grad) for n, p in named_params if p.grad is not None and not p.grad.is_sparse]
    if not _any_on_host(_nonfinite_flags(g for _, g in named).values()):
        return []
    flags = [next(iter(_nonfinite_flags([g]).values())) for _, g in named]
    first = flags[0].device
    bad = torch.stack([f.to(first, non_blocking=True) for f in flags]).tolist()
    return [n for (n, _), b in zip(named, bad) if b]


_TORCH_TO_MIXPREC = {torch.optim.AdamW: mixprec_optim.AdamW, torch.optim.Adam: mixprec_optim.Adam,
                     torch.optim.SGD: mixprec_optim.SGD}


class Precision:
    """A precision mode for a training loop (see the module docstring for the modes).

    `precision`: a mode string or int; None reads $MIXPREC_PRECISION (set by `mixprec run
    --precision`), defaulting to "32-true". `device`: where autocast and the scaler run; by default
    the device of the model given to setup() (before that: cuda if available, else cpu).
    `master_weights`, `rounding`, `seed`: for 16-true/bf16-true, the options of the mixprec.optim
    optimizer setup() builds (master_weights=False with rounding="stochastic" keeps no fp32 copy,
    4 B/param less, and stays unbiased; "nearest" loses updates below half an ulp).
    `master_weights="remainder"` (bf16-true) and `moments` ("fp32", "bf16", "8bit", "fp8"):
    compressed Adam/AdamW state (mixprec.optim's docstring): bf16 weight + remainder + 8-bit (or
    fp8) moments hold 6 B/param where fp32 weights and AdamW hold 12.
    `scaler`: a configured mixprec.GradScaler for 16-mixed (default: GradScaler's defaults).
    `track_overflow_names`: under 16-mixed, read found_inf after each step (one host sync) and,
    when the step overflowed, record the names of the params whose grads held inf/NaN (stats()).
    `policy`: passed to mixprec.autocast.
    """

    def __init__(
        self,
        precision: str | int | None = None,
        *,
        device: str | torch.device | None = None,
        master_weights: bool | str = True,
        rounding: str = "nearest",
        seed: int | None = None,
        moments: str = "fp32",
        scaler: GradScaler | None = None,
        track_overflow_names: bool = False,
        policy: Any = None,
    ) -> None:
        if precision is None:
            self.precision = parse_precision(os.environ.get(ENV_VAR, "32-true"), source=f"${ENV_VAR}")
        else:
            self.precision = parse_precision(precision)
        self.mode = MODES[self.precision]
        if rounding not in ops.ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {list(ops.ROUNDING_MODES)}, got {rounding!r}")
        if (not master_weights or rounding != "nearest") and not self.mode.half_weights:
            raise ValueError(
                f"master_weights={master_weights!r}, rounding={rounding!r} apply to the weights of "
                f"'16-true' and 'bf16-true'; precision {self.precision!r} takes the defaults "
                "(master_weights=True, rounding='nearest')")
        if master_weights and rounding != "nearest":
            raise ValueError(f"rounding={rounding!r} applies without fp32 master weights: pass "
                             "master_weights=False with it (master weights are rounded to nearest)")
        if moments not in mixprec_optim.MOMENT_DTYPES:
            raise ValueError(f"moments must be one of {list(mixprec_optim.MOMENT_DTYPES)}, got {moments!r}")
        if (master_weights == "remainder" or moments != "fp32") and not self.mode.half_weights:
            raise ValueError(
                f"master_weights={master_weights!r}, moments={moments!r} (compressed optimizer state) apply "
                f"to the optimizer setup() builds for '16-true' and 'bf16-true'; under {self.precision!r} "
                "build mixprec.optim.AdamW(params, master_weights=..., moments=...) yourself")
        if master_weights == "remainder" and self.dtype is not torch.bfloat16:
            raise ValueError("master_weights='remainder' needs bf16 weights (bf16 + 16 bits is fp32): use "
                             "'bf16-true', or master_weights=True with '16-true'")
        if scaler is not None and not self.mode.scaled:
            raise ValueError(f"scaler= is for '16-mixed'; precision {self.precision!r} uses no loss scaling")
        self.master_weights = master_weights
        self.rounding = rounding
        self.moments = moments
        self.seed = seed
        self.policy = policy
        self._fp8_policy: Any = None  # built on first use (region_policy)
        self.track_overflow_names = track_overflow_names
        self._device = torch.device(device) if device is not None else None
        default_type = self._device.type if self._device is not None else (
            "cuda" if torch.cuda.is_available() else "cpu")
        self._scaler: GradScaler | None = None
        if self.mode.scaled:
            self.scaler = scaler if scaler is not None else GradScaler(default_type)
        self._modules: list[nn.Module] = []
        self._warned: set[str] = set()
        self._scaled = False  # prec.backward()/scale() ran this iteration
        self._grad_versions: dict[int, int] | None = None
        self._checked: bool | None = None  # _check_iteration's verdict this iteration
        self._unscaled: set[int] = set()  # ids of the optimizers unscale_() ran on this iteration
        self._overflow_names: list[str] = []
        if self._device is not None:
            self._advise_hardware(self._device)

    # -- properties -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The mode's dtype: autocast's for mixed modes, the weights' for true modes."""
        return self.mode.dtype

    @property
    def device_type(self) -> str:
        if self._device is not None:
            return self._device.type
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def scaler(self) -> GradScaler | None:
        """The GradScaler of 16-mixed (None otherwise)."""
        return self._scaler

    @scaler.setter
    def scaler(self, scaler: Any) -> None:
        """Use `scaler` from now on (16-mixed): a mixprec.GradScaler, or any object with
        torch.amp.GradScaler's scale/unscale_/step/update (e.g. torch's own); None turns loss
        scaling off."""
        if scaler is not None:
            if not self.mode.scaled:
                raise ValueError(f"scaler= is for '16-mixed'; precision {self.precision!r} uses no loss scaling")
            missing = [m for m in ("scale", "unscale_", "step", "update", "is_enabled") if not hasattr(scaler, m)]
            if missing:
                raise TypeError(f"scaler must be a GradScaler (mixprec.GradScaler or torch.amp.GradScaler), "
                                f"got {type(scaler).__name__} without {', '.join(missing)}")
        self._scaler = scaler

    def __repr__(self) -> str:
        return f"Precision({self.precision!r})"

    def warn_once(self, key: str, message: str, stacklevel: int = 3) -> None:
        """Warn `message` once per Precision and `key` (a mistake or advice that repeats every
        step is said once); `stacklevel` as in warnings.warn, 1 being warn_once itself."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=stacklevel)

    @property
    def device(self) -> torch.device | None:
        """Where autocast runs: the device given, or set by setup()/set_device(); None before."""
        return self._device

    def set_device(self, device: str | torch.device) -> None:
        """Run autocast on `device` from now on (e.g. where a wrapper saw the inputs), and warn
        once if the mode's half type is slow there."""
        self._device = torch.device(device)
        self._advise_hardware(self._device, stacklevel=5)

    def _advise_hardware(self, device: torch.device, stacklevel: int = 4) -> None:
        """Warn where the chosen half type is slow on this hardware (mixprec.hardware's advice)."""
        if device.type == "cuda" and not torch.cuda.is_available():
            return  # nothing to describe; autocast and GradScaler say they are disabled
        advice = hardware.precision_warning(hardware.device_facts(device), self.precision)
        if advice is not None:
            self.warn_once("hardware", advice, stacklevel)

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, *optimizers: torch.optim.Optimizer) -> Any:
        """Put `model` (the same object, patched in place) and its optimizers in this mode.

        True modes cast the model's floating params and buffers to the mode's dtype; for
        16-true/bf16-true each optimizer becomes a mixprec.optim one with fp32 master weights
        (seeded with the exact fp32 values the params had). Returns the model, or (model,
        *optimizers) when optimizers are given. Create LR schedulers after setup()."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"setup(model, ...): model must be a torch.nn.Module, got {type(model).__name__}")
        tensors = list(model.parameters()) + list(model.buffers())
        if self._device is None and tensors:
            self._device = tensors[0].device
        self._advise_hardware(self._device or torch.device(self.device_type))
        if self.precision == "64-true":
            for opt in optimizers:
                if isinstance(opt, mixprec_optim.FusedOptimizer):
                    raise ValueError("64-true: mixprec.optim optimizers take fp32/fp16/bf16 params; pass a "  # noqa: TRY004
                                     "torch.optim optimizer for a float64 model")
        snapshots: dict[int, Tensor] = {}
        if not self.mode.mixed and self.dtype is not torch.float32:
            if self.mode.half_weights and self.master_weights:
                # The fp32 values the masters start from (the old storage: no copy is made).
                snapshots = {id(p): p.detach() for p in model.parameters() if p.dtype == torch.float32}
            cast_module(model, self.dtype)
        converted = tuple(self._setup_optimizer(opt, snapshots) for opt in optimizers)
        inner = model.__dict__.get("forward")
        if isinstance(inner, _PrecisionForward):
            inner = inner.inner
        model.forward = _PrecisionForward(model, self, inner)
        if all(m is not model for m in self._modules):
            self._modules.append(model)
        return (model, *converted) if optimizers else model

    def _setup_optimizer(self, opt: torch.optim.Optimizer, snapshots: dict[int, Tensor]) -> torch.optim.Optimizer:
        if not self.mode.half_weights:
            return opt
        if isinstance(opt, mixprec_optim.FusedOptimizer):
            new = opt
            self.apply_options(opt)
        elif type(opt) in _TORCH_TO_MIXPREC:
            new = self._equivalent_mixprec_optimizer(opt)
            self._guard_replaced(opt, new)
        elif not self.master_weights and self.rounding == "nearest":
            return opt  # updating the half weights in place, rounded to nearest, is what was asked
        else:
            raise TypeError(
                f"{self.precision}: setup() needs an optimizer with fp32 master weights; it converts "
                "torch.optim.AdamW, Adam and SGD (and takes mixprec.optim.AdamW, Adam, SGD as they are), "
                f"got {type(opt).__module__}.{type(opt).__name__}. Pass one of those, or "
                f"Precision({self.precision!r}, master_weights=False) to let this optimizer update the "
                "half-precision weights directly (rounded to nearest)")
        self.seed_master_weights(new, snapshots)
        return new

    def apply_options(self, optimizer: torch.optim.Optimizer) -> None:
        """Give a mixprec.optim optimizer this Precision's master_weights / rounding / seed
        (16-true, bf16-true; nothing otherwise), so that e.g. Precision("bf16-true",
        master_weights=False, rounding="stochastic") holds for a default mixprec.optim.AdamW.
        Options set on the optimizer itself are kept (with a warning) when the Precision has the
        defaults. ValueError naming the fix, changing nothing, when both set different options,
        or when the optimizer already holds state built for its own options."""
        if not self.mode.half_weights or not isinstance(optimizer, mixprec_optim.FusedOptimizer):
            return
        name = type(optimizer).__name__
        keys, ours, default = ["master_weights", "rounding"], [self.master_weights, self.rounding], [True, "nearest"]
        if isinstance(optimizer, mixprec_optim.Adam):
            keys.append("moments"), ours.append(self.moments), default.append("fp32")
        elif self.master_weights == "remainder" or self.moments != "fp32":
            raise ValueError(f"{self.precision}: master_weights={self.master_weights!r}, moments={self.moments!r} "
                             f"(compressed state) are Adam/AdamW's; the {name} given has no such state")
        ours, default = tuple(ours), tuple(default)
        asked = ", ".join(f"{k}={v!r}" for k, v in zip(keys, ours))
        to_apply, kept = [], None
        for group in optimizer.param_groups:
            theirs = tuple(group.get(k, d) for k, d in zip(keys, default))
            if theirs == ours:
                continue
            if ours == default:
                kept = theirs
                continue
            if theirs != default:
                raise ValueError(
                    f"{self.precision}: the precision asks for {asked} but the {name} was built with "
                    f"{', '.join(f'{k}={v!r}' for k, v in zip(keys, theirs))}: set them in one place (build "
                    f"the optimizer with the defaults, or drop them from the precision)")
            if any(p in optimizer.state for p in group["params"]):
                raise ValueError(
                    f"{self.precision}: {asked} cannot be applied to a {name} that has already stepped "
                    f"with fp32 master weights (its state holds them): build it as mixprec.optim.{name}("
                    f"params, ..., {asked}) before its first step")
            to_apply.append(group)
        if kept is not None:
            self.warn_once("optimizer-options", (
                f"{self.precision}: the {name} given keeps its own "
                f"{', '.join(f'{k}={v!r}' for k, v in zip(keys, kept))}, not the precision's ({asked})"), 4)
        for group in to_apply:  # checked every group first: an error above changed nothing
            group.update(zip(keys, ours))
            if self.seed is not None:
                group["seed"] = int(self.seed)
        if to_apply:  # param groups added later get them too
            optimizer.defaults.update(zip(keys, ours))
            if self.seed is not None:
                optimizer.defaults["seed"] = int(self.seed)

    def seed_master_weights(self, optimizer: torch.optim.Optimizer, fp32: Mapping[int, Tensor]) -> None:
        """Start the fp32 master weights of a mixprec.optim optimizer from `fp32` (param id -> the
        exact fp32 value the param had before it was cast to fp16/bf16), instead of from the
        rounded weights. Nothing for other optimizers or groups without master weights."""
        if not isinstance(optimizer, mixprec_optim.FusedOptimizer):
            return
        for group in optimizer.param_groups:
            if not group.get("master_weights", True):
                continue
            for p in group["params"]:
                value = fp32.get(id(p))
                if value is None:
                    continue
                state = optimizer.state[p]
                if group["master_weights"] == "remainder":  # the weight and its remainder are the fp32 value
                    weight, state["master_remainder"] = split_master(value)
                    p.detach().copy_(weight)
                    continue
                if "master_param" in state:
                    state["master_param"].copy_(value)
                else:
                    state["master_param"] = value

    def _guard_replaced(self, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
        """Warn about the two ways of keeping on training with `old` after setup() replaced it:
        an LR scheduler made before setup() (torch's schedulers wrap the step of the optimizer
        they were made over) and a later old.step() (a step pre-hook)."""
        what = (f"{self.precision}: setup() replaced the {type(old).__module__}.{type(old).__name__} "
                f"with a mixprec.optim.{type(new).__name__} (it holds the fp32 master weights)")
        if hasattr(old.step, "_wrapped_by_lr_sched"):
            self.warn_once(f"scheduler-before-setup-{id(old)}", (
                f"{what}, but an LR scheduler was created over the old optimizer before setup(): it "
                "changes the old optimizer's learning rate, so the schedule is not applied. Create "
                "the scheduler after setup(), over the optimizer setup() returns."), 6)

        def stepped_old(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.warn_once(f"old-optimizer-{id(optimizer)}", (
                f"{what}, but the old optimizer was stepped: it updates the half-precision weights "
                "directly, without master weights. Step the optimizer setup() returned "
                "(model, optimizer = prec.setup(model, optimizer))."), 4)

        old.register_step_pre_hook(stepped_old)

    def _equivalent_mixprec_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The mixprec.optim optimizer with the same param groups, hyper-parameters and state."""
        cls = _TORCH_TO_MIXPREC[type(opt)]
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in opt.defaults.items() if k in accepted and k != "params"}
        groups = [dict(g) for g in opt.param_groups]
        for g in groups:  # torch's per-group implementation flags mean nothing to ours
            for key in ("fused", "foreach", "capturable"):
                g.pop(key, None)
        compressed = {"moments": self.moments} if issubclass(cls, mixprec_optim.Adam) else {}
        if self.master_weights == "remainder" and not compressed or self.moments != "fp32" and not compressed:
            raise ValueError(f"{self.precision}: master_weights={self.master_weights!r}, moments={self.moments!r} "
                             f"(compressed state) are Adam/AdamW's; got a {type(opt).__name__}")
        new = cls(groups, **kwargs, master_weights=self.master_weights, rounding=self.rounding, seed=self.seed,
                  **compressed)
        if opt.state:
            new.load_state_dict(opt.state_dict())
        return new

    # -- the forward ------------------------------------------------------------------------------------
    def convert_input(self, data: Any) -> Any:
        """Floating tensors (nested) to the dtype of a true mode; unchanged otherwise."""
        if self.mode.mixed or self.dtype is torch.float32:
            return data
        return cast_floats(data, self.dtype)

    def convert_output(self, data: Any) -> Any:
        """Floating outputs back to torch's default dtype (fp32), so loss code written for fp32
        runs unchanged, as in Fabric. Unchanged under 32-true."""
        if self.precision == "32-true":
            return data
        return cast_floats(data, torch.get_default_dtype())

    def forward_context(self) -> contextlib.AbstractContextManager:
        """The context a set-up model's forward runs in (autocast for mixed modes)."""
        return self.autocast()

    def autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """mixprec.autocast for mixed modes (e.g. around a loss or a validation loop); the default
        dtype set to the mode's for true modes; nothing for 32-true."""
        if self.mode.mixed:
            return autocast(self.device_type, dtype=self.dtype, enabled=enabled, policy=self.region_policy())
        if self.dtype is torch.float32 or not enabled:
            return contextlib.nullcontext()
        return default_dtype(self.dtype)

    def region_policy(self) -> Any:
        """The policy of this mode's autocast regions: the one given, else for fp8 modes torch's
        table with linear layers on the "fp8" rule (per-module opt-out: mixprec.set_policy)."""
        if self.policy is not None or not self.mode.fp8:
            return self.policy
        if self._fp8_policy is None:
            from mixprec.policy import default_policy

            self._fp8_policy = default_policy(self.device_type).override({"aten::linear": "fp8"})
        return self._fp8_policy

    # -- the step ---------------------------------------------------------------------------------------
    def _scaling(self) -> bool:
        return self._scaler is not None and self._scaler.is_enabled()

    def scale(self, loss: Tensor) -> Tensor:
        """loss times the loss scale (16-mixed); the loss itself otherwise."""
        if not self._scaling():
            return loss
        self._scaled = True
        return self._scaler.scale(loss)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """loss.backward(), on the scaled loss under 16-mixed."""
        if not self._scaling():
            loss.backward(*args, **kwargs)
            return
        self.scale(loss).backward(*args, **kwargs)
        self._checked = None
        self._grad_versions = {id(p): p.grad._version for m in self._modules
                               for p in m.parameters() if p.grad is not None}

    def _check_iteration(self) -> bool:
        """Before the grads are unscaled: were they scaled, and left alone since? Warns once per
        mistake; returns False when the loss was not scaled (the grads are true grads)."""
        if self._checked is None:
            self._checked = self._check_grads()
        return self._checked

    def _check_grads(self) -> bool:
        if not self._scaled:
            self.warn_once("unscaled-backward", (
                "16-mixed: the gradients were not produced by prec.backward(loss) (loss.backward() "
                "called directly?), so they are not scaled and small fp16 gradients may underflow. "
                "Call prec.backward(loss). This step uses the gradients as they are (skipped if "
                "they hold inf/NaN)."), 5)
            return False
        versions, self._grad_versions = self._grad_versions, None
        if versions is not None:
            for m in self._modules:
                for p in m.parameters():
                    if p.grad is not None and versions.get(id(p), -1) != p.grad._version:
                        self.warn_once("modified-scaled-grads", (
                            "16-mixed: gradients were modified in place after prec.backward() while still "
                            "scaled (e.g. torch.nn.utils.clip_grad_norm_ on scaled gradients clips against "
                            "max_norm * scale, i.e. not at all). Use prec.clip_grad_norm_(optimizer, "
                            "max_norm), or call prec.unscale_(optimizer) before touching gradients."), 5)
                        return True
        return True

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide `optimizer`'s grads by the loss scale now (16-mixed; nothing otherwise), for
        code that reads or edits grads before step(). Once per iteration: a second call before
        step() does nothing (the grads are unscaled already)."""
        if self._scaling() and self._check_iteration() and id(optimizer) not in self._unscaled:
            self._scaler.unscale_(optimizer)
            self._unscaled.add(id(optimizer))

    def clip_grad_norm_(self, optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the true (unscaled) gradients of `optimizer` to total norm `max_norm` and return
        that norm, under every mode (mixprec optimizers apply the clip inside their step)."""
        if self._scaling() and self._check_iteration():
            if isinstance(self._scaler, GradScaler):
                return self._scaler.clip_grad_norm_(optimizer, max_norm, norm_type)
            self.unscale_(optimizer)  # a scaler of torch's kind: torch's recipe
        if isinstance(optimizer, FoldsClip):
            return clip_folded_(optimizer, max_norm, norm_type).total_norm
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    def step(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        """optimizer.step(); under 16-mixed through the scaler (skipped on inf/NaN) followed by
        scaler.update(), which ends the iteration."""
        if not self._scaling():
            return optimizer.step(**kwargs)
        scaled = self._check_iteration()
        self._scaled, self._checked, self._grad_versions = False, None, None
        self._unscaled.clear()
        if not scaled:
            return self._step_unscaled(optimizer, **kwargs)
        scaler = self._scaler
        out = scaler.step(optimizer, **kwargs)
        if (self.track_overflow_names and isinstance(scaler, GradScaler)
                and _any_on_host(scaler.found_inf_per_device(optimizer).values())):
            self._overflow_names = self._named_nonfinite(optimizer)
        scaler.update()
        return out

    def _step_unscaled(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        # The grads were never scaled: skipping a step on inf/NaN is a host decision (a plain
        # optimizer's step() cannot be skipped on the device), so one read and one sync.
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if _any_on_host(_nonfinite_flags(grads).values()):
            if self.track_overflow_names:
                self._overflow_names = self._named_nonfinite(optimizer)
            return None
        return optimizer.step(**kwargs)

    def _named_nonfinite(self, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        wanted = None if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
        named = [(n, p) for m in self._modules for n, p in m.named_parameters()
                 if wanted is None or id(p) in wanted]
        return nonfinite_grad_names(named)

    # -- monitoring and checkpoints --------------------------------------------------------------------
    def stats(self, model: nn.Module | None = None) -> dict[str, Any]:
        """precision, scale, skipped_steps (= overflows: every overflow skips its step),
        scale_at_floor and nonfinite_since_step (see GradScaler.stats) and overflow_params: the params whose grads overflowed in the last overflowing step (with
        track_overflow_names=True), or, when `model` is given, those whose current grads hold
        inf/NaN; in fp8 modes fp8_overflows (mixprec.fp8.overflows()). Synchronises: for logging."""
        if not self._scaling():
            scaler = {}
        elif isinstance(self._scaler, GradScaler):
            scaler = self._scaler.stats()
        else:  # a scaler of torch's kind knows its scale only
            scaler = {"scale": self._scaler.get_scale()}
        names = nonfinite_grad_names(model.named_parameters()) if model is not None else list(self._overflow_names)
        skipped = int(scaler.get("skipped_steps", 0))
        fp8_overflows = {}
        if self.mode.fp8:
            from mixprec import fp8  # loaded on first use, as the policy's fp8 rule loads it
            fp8_overflows = {"fp8_overflows": fp8.overflows()}
        # scale_at_floor / nonfinite_since_step: every step since that one was non-finite and the
        # scale backed off to its floor (GradScaler warns once); False / None otherwise.
        return {"precision": self.precision, "scale": float(scaler.get("scale", 1.0)),
                "skipped_steps": skipped, "overflows": skipped, "overflow_params": names,
                "scale_at_floor": bool(scaler.get("scale_at_floor", False)),
                "nonfinite_since_step": scaler.get("nonfinite_since_step"), **fp8_overflows}

    def state_dict(self) -> dict[str, Any]:
        """The loss-scaler state (16-mixed; torch.amp.GradScaler's format), else {}."""
        return self._scaler.state_dict() if self._scaling() else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._scaling():
            self._scaler.load_state_dict(state_dict)
        elif state_dict:
            self.warn_once("ignored-state", f"{self.precision} uses no loss scaler: the loss-scale state in "
                            "this checkpoint is ignored")
