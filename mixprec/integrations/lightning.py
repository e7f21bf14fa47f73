"""MixprecPrecision: a Lightning Fabric precision plugin backed by mixprec.Precision.

    fabric = Fabric(accelerator="cuda", devices=1, plugins=[MixprecPrecision("16-mixed")])
    model, optimizer = fabric.setup(model, optimizer)   # mixprec.optim.AdamW for fused steps
    fabric.backward(loss)                               # scaled by mixprec.GradScaler
    fabric.clip_gradients(model, optimizer, max_norm=1.0)
    optimizer.step()                                    # scaler.step + update, skip on overflow

It behaves as Fabric's MixedPrecision / HalfPrecision / DoublePrecision for the same string
(inputs cast to the mode's dtype, outputs back to the default dtype, the forward under the
mode's context), with mixprec's autocast, GradScaler and, for 16-true/bf16-true, master weights:
a precision plugin cannot replace the optimizer Fabric holds, so for those modes pass a
mixprec.optim optimizer (fp32 master weights); a torch.optim one updates the half weights
directly, as Fabric's HalfPrecision does, with a warning saying so.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from torch import Tensor, nn

from mixprec import optim as mixprec_optim
from mixprec.precision import Precision, cast_floats, default_dtype


class MixprecPrecision(FabricPrecision):
    """Fabric precision plugin for every mixprec.Precision mode ("32-true", "64-true",
    "16-mixed", "bf16-mixed", "16-true", "bf16-true"); keyword arguments go to mixprec.Precision
    (device, scaler, master_weights, rounding, track_overflow_names, policy)."""

    def __init__(self, precision: str | int = "16-mixed", **precision_kwargs: Any) -> None:
        self.mixprec = Precision(precision, **precision_kwargs)
        self._device_given = precision_kwargs.get("device") is not None
        self.precision = self.mixprec.precision  # Fabric reads this attribute
        self.scaler = self.mixprec.scaler

    # -- module and data ------------------------------------------------------------------------------
    def convert_module(self, module: nn.Module) -> nn.Module:
        mode = self.mixprec.mode
        if not mode.mixed and mode.dtype is not torch.float32:
            return module.to(dtype=mode.dtype)
        return module

    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        mode = self.mixprec.mode
        if not mode.mixed and mode.dtype is not torch.float32:
            return default_dtype(mode.dtype)
        return contextlib.nullcontext()

    def module_init_context(self) -> contextlib.AbstractContextManager:
        return self.tensor_init_context()

    def forward_context(self) -> contextlib.AbstractContextManager:
        return self.mixprec.forward_context()

    def convert_input(self, data: Any) -> Any:
        if not self._device_given:  # autocast's device type: where the inputs are
            first = _first_tensor(data)
            if first is not None and first.device != self.mixprec.device:
                self.mixprec.set_device(first.device)
        # As Fabric: floating inputs to the mode's dtype, for mixed modes too.
        if self.precision == "32-true":
            return data
        return cast_floats(data, self.mixprec.dtype)

    def convert_output(self, data: Any) -> Any:
        return self.mixprec.convert_output(data)

    # -- backward and step ------------------------------------------------------------------------------
    def backward(self, tensor: Tensor, model: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        self.mixprec.backward(tensor, *args, **kwargs)

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        if self.mixprec.mode.half_weights and not isinstance(optimizer, mixprec_optim.FusedOptimizer):
            self.mixprec.warn_once("fabric-optimizer", (
                f"{self.precision} under Fabric with {type(optimizer).__name__}: the half-precision weights are "
                "updated directly (no fp32 master weights, as Fabric's HalfPrecision). Pass "
                "mixprec.optim.AdamW / Adam / SGD to fabric.setup to keep fp32 master weights."))
        if self.mixprec.scaler is not None and isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("AMP and the LBFGS optimizer are not compatible.")
        return self.mixprec.step(optimizer, **kwargs)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        # Fabric's clip_gradients calls this, then clips with torch: unscaling first makes that
        # correct for every optimizer, mixprec.optim included (its step then skips unscaling).
        self.mixprec.unscale_(optimizer)

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.mixprec.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mixprec.load_state_dict(state_dict)


def _first_tensor(data: Any) -> Tensor | None:
    if isinstance(data, Tensor):
        return data
    values = data.values() if isinstance(data, dict) else data if isinstance(data, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None
