"""mixprec: mixed-precision training for PyTorch on fused C++/CUDA kernels.

`import mixprec` loads no kernels (so `mixprec --help` and `mixprec doctor` work without a
build): the names below are imported at first use (PEP 562), and the compiled extension is
loaded, or built, when a kernel first runs.
"""
from __future__ import annotations

import importlib
from typing import Any

# Imported now: `autocast` is both this function and the submodule mixprec.autocast, and
# importing the submodule later would rebind the package attribute to the module. It loads no
# kernels at import.
from mixprec.autocast import (
    autocast,
    clear_weight_cache,
    custom_bwd,
    custom_fwd,
    keep_fp32,
    set_policy,
    weight_cache_info,
)

_LAZY = {  # public name -> the module that defines it
    "ops": "mixprec.ops", "optim": "mixprec.optim", "fp8": "mixprec.fp8",
    "GradScaler": "mixprec.grad_scaler", "OptState": "mixprec.grad_scaler",
    "DynamicLossScaler": "mixprec.loss_scaler", "MinScaleOverflowError": "mixprec.loss_scaler",
    "Policy": "mixprec.policy", "default_policy": "mixprec.policy",
    "Precision": "mixprec.precision",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mixprec' has no attribute {name!r}")
    value = importlib.import_module(module)
    if not module.endswith("." + name):
        value = getattr(value, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DynamicLossScaler", "GradScaler", "MinScaleOverflowError", "OptState", "Policy", "Precision", "autocast",
    "clear_weight_cache", "custom_bwd", "custom_fwd", "default_policy", "fp8", "keep_fp32", "ops", "optim",
    "set_policy", "weight_cache_info",
]
__version__ = "0.1.0"
