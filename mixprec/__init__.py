"""mixprec: mixed-precision training for PyTorch on fused C++/CUDA kernels."""
from mixprec import ops, optim
from mixprec.grad_scaler import GradScaler, OptState
from mixprec.loss_scaler import DynamicLossScaler, MinScaleOverflowError

__all__ = ["DynamicLossScaler", "GradScaler", "MinScaleOverflowError", "OptState", "ops", "optim"]
__version__ = "0.1.0"
