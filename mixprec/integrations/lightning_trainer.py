"""MixprecTrainerPrecision: the Lightning Trainer's precision plugin backed by mixprec.Precision.

    trainer = Trainer(plugins=[MixprecTrainerPrecision("bf16-mixed")], gradient_clip_val=1.0)
    trainer.fit(model)       # configure_optimizers may return mixprec.optim.AdamW for fused steps

The same plugin as mixprec.integrations.lightning.MixprecPrecision (Fabric's), on the Trainer's
interface, behaving as the Trainer's MixedPrecision / HalfPrecision / DoublePrecision for the same
string: mixed modes leave the batch as it is and run the step under autocast (no weight cache,
as the Trainer's), true modes cast the batch and set the default dtype. Beyond them:
- Trainer(gradient_clip_val=...) clips every optimizer, mixprec.optim and torch's fused ones
  included (the Trainer's MixedPrecision refuses those): a mixprec.optim optimizer gets the clip
  from one read of the scaled gradients, applied inside its step.
- 16-true/bf16-true with a mixprec.optim optimizer: its fp32 master weights start from the exact
  fp32 weights the module had before the plugin cast it (the Trainer casts the module before
  configure_optimizers runs), and the plugin's master_weights / rounding / seed are applied.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision as TrainerPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from mixprec.autocast import autocast
from mixprec.clipping import FoldsClip
from mixprec.integrations.lightning import PluginCore, cast_floating


class MixprecTrainerPrecision(PluginCore, TrainerPrecision):
    """Trainer precision plugin for every mixprec.Precision mode ("32-true", "64-true",
    "16-mixed", "bf16-mixed", "16-true", "bf16-true"); keyword arguments go to mixprec.Precision
    (device, scaler, master_weights, rounding, seed, track_overflow_names, policy)."""

    def __init__(self, precision: str | int = "16-mixed", **precision_kwargs: Any) -> None:
        super().__init__(precision, **precision_kwargs)
        self._fp32: dict[int, Tensor] = {}  # convert_module -> connect: the weights before the cast

    # -- module, data and context -----------------------------------------------------------------------
    def convert_module(self, module: nn.Module) -> nn.Module:
        if self.mixprec.mode.half_weights and self.mixprec.master_weights:
            # The old fp32 storage (no copy), until connect() seeds the optimizers' masters with it.
            self._fp32 = {id(p): p.detach() for p in module.parameters() if p.dtype == torch.float32}
        return super().convert_module(module)

    def connect(self, model: nn.Module, optimizers: list[Any], lr_schedulers: list[Any]) -> tuple[nn.Module, list[Any], list[Any]]:
        first = next(iter(model.parameters()), None)
        if first is not None:
            self.see_device(first.device)
        for optimizer in optimizers:
            self.prepare_optimizer(optimizer)
            self.mixprec.seed_master_weights(optimizer, self._fp32)
        self._fp32 = {}
        return model, optimizers, lr_schedulers

    def convert_input(self, data: Any) -> Any:
        # As the Trainer's plugins: the batch is cast under true modes only.
        if self.mixprec.mode.mixed or self.precision == "32-true":
            return data
        return cast_floating(data, self.mixprec.dtype)

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self.mixprec.mode.mixed:  # the Trainer's MixedPrecision turns autocast's cache off
            return autocast(self.mixprec.device_type, dtype=self.mixprec.dtype, policy=self.mixprec.policy,
                            cache_enabled=False)
        return super().forward_context()

    # -- backward, clipping and the step ------------------------------------------------------------------
    def pre_backward(self, tensor: Tensor, module: Any) -> Tensor:
        return super().pre_backward(self.mixprec.scale(tensor), module)

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        self.prepare_optimizer(optimizer)
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if isinstance(optimizer, torch.optim.LBFGS):
            raise MisconfigurationException("AMP and the LBFGS optimizer are not compatible.")
        closure_result = closure()
        # Backward skipped (the step returned None) under automatic optimization: no step.
        skipped = closure_result is None and model.automatic_optimization
        if not skipped and not isinstance(optimizer, FoldsClip):
            # As the Trainer's MixedPrecision: hooks and clipping see the true gradients. A
            # mixprec.optim optimizer keeps them scaled; its clip and unscaling happen in its step.
            self.mixprec.unscale_(optimizer)
        self._after_closure(model, optimizer)
        if skipped:
            return closure_result
        return self.mixprec.step(optimizer, **kwargs)

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        self.mixprec.clip_grad_norm_(optimizer, clip_val)

    def clip_grad_by_value(self, optimizer: Any, clip_val: float) -> None:
        self.mixprec.unscale_(optimizer)  # once per step: nothing if unscaled already
        torch.nn.utils.clip_grad_value_(list(self.main_params(optimizer)), clip_value=clip_val)
