"""MixprecPrecision: a Lightning Fabric precision plugin backed by mixprec.Precision.

    fabric = Fabric(accelerator="cuda", devices=1, plugins=[MixprecPrecision("16-mixed")])
    model, optimizer = fabric.setup(model, optimizer)   # mixprec.optim.AdamW for fused steps
    fabric.backward(loss)                               # scaled by mixprec.GradScaler
    fabric.clip_gradients(model, optimizer, max_norm=1.0)
    optimizer.step()                                    # scaler.step + update, skip on overflow

It behaves as Fabric's MixedPrecision / HalfPrecision / DoublePrecision for the same string
(inputs cast to the mode's dtype, outputs back to the default dtype, the forward under the
mode's context, "16-mixed" on the CPU turned into "bf16-mixed" with Fabric's warning), with
mixprec's autocast, GradScaler and, for 16-true/bf16-true, master weights: a precision plugin
cannot replace the optimizer Fabric holds, so for those modes pass a mixprec.optim optimizer
(fp32 master weights; the plugin's master_weights / rounding / seed are applied to it); a
torch.optim one updates the half weights directly, as Fabric's HalfPrecision does, with a
warning saying so. The Lightning Trainer's plugin is in mixprec.integrations.lightning_trainer.

clip_gradients() clips mixprec.optim optimizers under Lightning's stock plugins too, which refuse
(Trainer) or cannot (Fabric's 16-mixed) clip optimizers that unscale inside their step.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from mixprec import optim as mixprec_optim
from mixprec.clipping import FoldsClip, clip_folded_
from mixprec.grad_scaler import GradScaler
from mixprec.precision import Precision, cast_module, default_dtype, parse_precision


def cast_floating(data: Any, dtype: torch.dtype) -> Any:
    """Every floating tensor in `data` (any collection Lightning's apply_to_collection walks) cast
    to `dtype`, as Lightning's plugins cast inputs and outputs; everything else unchanged."""
    return apply_to_collection(data, Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)


class PluginCore:
    """What the Fabric and the Trainer plugins share: one mixprec.Precision, the device, the
    scaler (assignable, as Lightning's), module and tensor casting, checkpoints, and the checks a
    plugin makes on an optimizer the first time it sees it."""

    def __init__(self, precision: str | int = "16-mixed", **precision_kwargs: Any) -> None:
        name = parse_precision(precision)
        device = precision_kwargs.get("device")
        self._device_given = device is not None
        self._kwargs = precision_kwargs
        self._auto_scaler = precision_kwargs.get("scaler") is None  # ours to replace
        if name == "16-mixed" and self._auto_scaler:
            device_type = torch.device(device).type if device is not None else (
                "cuda" if torch.cuda.is_available() else "cpu")
            if device_type == "cpu":
                self._warn_fp16_on_cpu()
                name = "bf16-mixed"
        self._set_mode(name)
        self._prepared: weakref.WeakSet = weakref.WeakSet()  # optimizers checked by prepare_optimizer

    def _set_mode(self, name: str) -> None:
        self.mixprec = Precision(name, **self._kwargs)
        self.precision = self.mixprec.precision  # Lightning reads this attribute

    def _warn_fp16_on_cpu(self) -> None:
        # Fabric's and the Trainer's own switch for precision="16-mixed" on the CPU, and its warning.
        rank_zero_warn(
            f"You passed `{type(self).__name__}('16-mixed')` for the CPU, but AMP with fp16 is not supported "
            "on CPU. Using 'bf16-mixed' instead (pass scaler=mixprec.GradScaler('cpu') to keep fp16 with "
            "loss scaling).", stacklevel=6)

    def see_device(self, device: torch.device) -> None:
        """Where the model and inputs are, when no device was given: autocast runs there, and an
        automatic "16-mixed" on the CPU becomes "bf16-mixed" (as Fabric's precision="16-mixed")."""
        if self._device_given or self.mixprec.device == device:
            return
        if self.precision == "16-mixed" and self._auto_scaler and device.type == "cpu":
            self._warn_fp16_on_cpu()
            self._set_mode("bf16-mixed")
        self.mixprec.set_device(device)

    # -- what Lightning's plugins expose ------------------------------------------------------------------
    @property
    def device(self) -> str:
        """The device autocast runs on, as a string (Lightning's MixedPrecision.device)."""
        return str(self.mixprec.device) if self.mixprec.device is not None else self.mixprec.device_type

    @property
    def scaler(self) -> Any:
        """The loss scaler of 16-mixed (None otherwise). Assigning one (a mixprec.GradScaler, a
        torch.amp.GradScaler, or None to turn scaling off) makes backward and step use it."""
        return self.mixprec.scaler

    @scaler.setter
    def scaler(self, scaler: Any) -> None:
        self.mixprec.scaler = scaler
        self._auto_scaler = False

    @property
    def _desired_input_dtype(self) -> torch.dtype:
        # Lightning's name for the dtype its plugins cast inputs to (read by its tests).
        return self.mixprec.dtype

    def _true_half_or_double(self) -> bool:
        return not self.mixprec.mode.mixed and self.mixprec.dtype is not torch.float32

    # -- module and data ------------------------------------------------------------------------------
    def convert_module(self, module: nn.Module) -> nn.Module:
        """True modes: floating params and buffers to the mode's dtype (complex ones kept, as
        Fabric's DoublePrecision does with module.double())."""
        if self._true_half_or_double():
            return cast_module(module, self.mixprec.dtype)
        return module

    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        if self._true_half_or_double():
            return default_dtype(self.mixprec.dtype)
        return contextlib.nullcontext()

    def module_init_context(self) -> contextlib.AbstractContextManager:
        return self.tensor_init_context()

    def forward_context(self) -> contextlib.AbstractContextManager:
        return self.mixprec.forward_context()

    def convert_output(self, data: Any) -> Any:
        if self.precision == "32-true":
            return data
        return cast_floating(data, torch.get_default_dtype())

    # -- optimizers -------------------------------------------------------------------------------------
    def prepare_optimizer(self, optimizer: Any) -> None:
        """Check (once) that `optimizer` can do what this precision asks, and apply the options
        (master_weights, rounding, seed) to a mixprec.optim one; errors name the fix."""
        if optimizer in self._prepared:
            return
        mode, name = self.mixprec.mode, type(optimizer).__name__
        fused = isinstance(optimizer, mixprec_optim.FusedOptimizer)
        if self.precision == "64-true" and fused:
            raise ValueError(f"64-true: mixprec.optim.{name} takes fp32/fp16/bf16 params; pass a torch.optim "
                             "optimizer for a float64 model")
        if mode.half_weights and not fused:
            if self.mixprec.rounding != "nearest":
                raise TypeError(
                    f"{self.precision} with rounding={self.mixprec.rounding!r}: {type(optimizer).__module__}.{name} "
                    "rounds its updates to nearest; pass mixprec.optim.AdamW / Adam / SGD, which apply the rounding")
            if self.mixprec.master_weights:
                self.mixprec.warn_once("fabric-optimizer", (
                    f"{self.precision} under Lightning with {name}: the half-precision weights are updated "
                    "directly (no fp32 master weights, as Lightning's HalfPrecision). Pass "
                    "mixprec.optim.AdamW / Adam / SGD to keep fp32 master weights."), 4)
        self.mixprec.apply_options(optimizer)
        self._prepared.add(optimizer)

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.mixprec.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mixprec.load_state_dict(state_dict)


class MixprecPrecision(PluginCore, FabricPrecision):
    """Fabric precision plugin for every mixprec.Precision mode ("32-true", "64-true",
    "16-mixed", "bf16-mixed", "16-true", "bf16-true"); keyword arguments go to mixprec.Precision
    (device, scaler, master_weights, rounding, seed, track_overflow_names, policy)."""

    def convert_input(self, data: Any) -> Any:
        if not self._device_given:  # autocast's device type: where the inputs are
            first = _first_tensor(data)
            if first is not None:
                self.see_device(first.device)
        # As Fabric: floating inputs to the mode's dtype, for mixed modes too.
        if self.precision == "32-true":
            return data
        return cast_floating(data, self.mixprec.dtype)

    def backward(self, tensor: Tensor, model: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        self.mixprec.backward(tensor, *args, **kwargs)

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        self.prepare_optimizer(optimizer)
        scaler = self.scaler
        if scaler is not None and isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("AMP and the LBFGS optimizer are not compatible.")
        if scaler is not None and not isinstance(scaler, GradScaler):
            # A scaler of another kind (torch.amp's): exactly Fabric's MixedPrecision steps.
            out = scaler.step(optimizer, **kwargs)
            scaler.update()
            return out
        return self.mixprec.step(optimizer, **kwargs)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        # Fabric's clip_gradients calls this, then clips with torch: unscaling first makes that
        # correct for every optimizer, mixprec.optim included (its step then skips unscaling).
        self.mixprec.unscale_(optimizer)


def clip_gradients(plugin: Any, optimizer: Any, clip_val: float, gradient_clip_algorithm: Any = "norm",
                   norm_type: float = 2.0) -> Tensor | None:
    """Clip `optimizer`'s true gradients under any Lightning precision plugin (Fabric's or the
    Trainer's, stock or ours), mixprec.optim and torch's fused optimizers included: Lightning's
    stock plugins refuse to clip optimizers that unscale inside their step, even under bf16-mixed.
    Returns the total norm for "norm" (None for "value"). In a LightningModule:

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val, gradient_clip_algorithm)

    and under Fabric: clip_gradients(fabric.strategy.precision, optimizer, max_norm).
    A mixprec.GradScaler (pass scaler=mixprec.GradScaler(...) to the stock MixedPrecision) and
    mixprec.optim optimizers clip from one read of the scaled gradients, inside the step."""
    if not clip_val or clip_val <= 0:
        return None
    optimizer = _unwrap(optimizer)
    scaler = getattr(plugin, "scaler", None)
    scaling = scaler is not None and scaler.is_enabled()
    by_value = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) == "value"
    if scaling and isinstance(scaler, GradScaler) and not by_value:
        return scaler.clip_grad_norm_(optimizer, clip_val, norm_type)  # knows what was unscaled
    # The Trainer's plugins (they have clip_grad_by_norm) unscale, before clipping, the grads of
    # the optimizers that do not unscale in their step; Fabric's leave that to clip_gradients.
    unscaled = hasattr(plugin, "clip_grad_by_norm") and not getattr(optimizer, "_step_supports_amp_scaling", False)
    if scaling and not unscaled:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if by_value:
        torch.nn.utils.clip_grad_value_(params, clip_val)
        return None
    if isinstance(optimizer, FoldsClip):
        return clip_folded_(optimizer, clip_val, norm_type).total_norm
    return torch.nn.utils.clip_grad_norm_(params, clip_val, norm_type)


def _unwrap(optimizer: Any) -> Any:
    """The optimizer inside Fabric's or the Trainer's wrapper: the scaler keys its state by the
    optimizer object that steps."""
    while True:
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner


def _first_tensor(data: Any) -> Tensor | None:
    if isinstance(data, Tensor):
        return data
    values = data.values() if isinstance(data, dict) else data if isinstance(data, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None
