"""mixprec: mixed-precision training for PyTorch on fused C++/CUDA kernels."""
from mixprec import ops, optim
from mixprec.autocast import (
    autocast,
    clear_weight_cache,
    custom_bwd,
    custom_fwd,
    keep_fp32,
    set_policy,
    weight_cache_info,
)
from mixprec.grad_scaler import GradScaler, OptState
from mixprec.loss_scaler import DynamicLossScaler, MinScaleOverflowError
from mixprec.policy import Policy, default_policy
from mixprec.precision import Precision

__all__ = [
    "DynamicLossScaler", "GradScaler", "MinScaleOverflowError", "OptState", "Policy", "Precision", "autocast",
    "clear_weight_cache", "custom_bwd", "custom_fwd", "default_policy", "keep_fp32", "ops", "optim",
    "set_policy", "weight_cache_info",
]
__version__ = "0.1.0"
