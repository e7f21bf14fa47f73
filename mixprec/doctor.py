"""`mixprec doctor`: what this machine supports for mixed precision, which mixprec kernels are
built, and the precision to use here, with the reason."""
from __future__ import annotations

import torch

OPS = ("non_finite_check_and_unscale_", "update_scale_", "grad_norm", "adam_step_", "sgd_step_")


def kernels_built() -> dict[str, bool]:
    """Whether every mixprec op has a kernel for each backend."""
    import mixprec  # noqa: F401  (loads the extension)

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {key: all(has(f"mixprec::{op}", key) for op in OPS) for key in ("CPU", "CUDA")}


def recommend(cuda: bool, capability: tuple[int, int] | None, bf16: bool) -> tuple[str, str]:
    """(precision, reason) for the hardware."""
    if not cuda:
        return "bf16-mixed", ("CPU: bf16 autocast is supported and needs no loss scaling; fp16 on CPUs is "
                              "usually slower than fp32")
    if bf16 and capability is not None and capability >= (8, 0):
        return "bf16-mixed", (f"compute capability {capability[0]}.{capability[1]}: bf16 tensor cores run as fast "
                              "as fp16, and bf16's range needs no loss scaling")
    if capability is not None and capability >= (7, 0):
        return "16-mixed", (f"compute capability {capability[0]}.{capability[1]}: fp16 tensor cores but no fast "
                            "bf16; use fp16 autocast with mixprec.GradScaler")
    return "32-true", "this GPU has no tensor cores: half precision saves memory but not time"


def report() -> list[tuple[str, str]]:
    """The lines `mixprec doctor` prints, as (label, value)."""
    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    built = kernels_built()
    precision, reason = recommend(cuda, capability, bf16)
    lines = [("torch", torch.__version__), ("CUDA (torch build)", str(torch.version.cuda))]
    if cuda:
        lines += [("GPU", torch.cuda.get_device_name()),
                  ("compute capability", f"{capability[0]}.{capability[1]}"),
                  ("tensor cores", "yes" if capability >= (7, 0) else "no"),
                  ("bf16", "supported" if bf16 else "not supported")]
    else:
        lines += [("GPU", "none (CPU only)")]
    lines += [("mixprec CPU kernels", "built" if built["CPU"] else "missing"),
              ("mixprec CUDA kernels", "built" if built["CUDA"] else "not built"),
              ("recommended precision", precision), ("why", reason)]
    return lines


def main() -> None:
    lines = report()
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label:>{width}}: {value}")
