"""What a device supports for mixed precision, and the advice that follows from it.

One source for `mixprec doctor` (which prints the facts and a recommendation) and
`mixprec.Precision` (which warns when the chosen mode is slow on its device). Imports only torch:
no kernels are needed to describe the hardware.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Tensor cores arrived with Volta (7.0), bf16 tensor cores with Ampere (8.0), fp8 with Ada (8.9).
_TENSOR_CORES = (7, 0)
_BF16_TENSOR_CORES = (8, 0)
_FP8_TENSOR_CORES = (8, 9)


@dataclass(frozen=True)
class DeviceFacts:
    """kind: "cpu" or "cuda"; capability: (major, minor) for a GPU, None for the CPU;
    tensor_cores / bf16 / fp8: the device has fast (tensor-core) arithmetic for that type."""

    kind: str
    name: str
    capability: tuple[int, int] | None
    tensor_cores: bool
    bf16: bool
    fp8: bool

    @property
    def capability_str(self) -> str:
        return "" if self.capability is None else f"{self.capability[0]}.{self.capability[1]}"


def cuda_facts(name: str, capability: tuple[int, int]) -> DeviceFacts:
    """The facts of a GPU with this name and compute capability (no GPU needed: for tests)."""
    capability = (int(capability[0]), int(capability[1]))
    return DeviceFacts("cuda", name, capability, tensor_cores=capability >= _TENSOR_CORES,
                       bf16=capability >= _BF16_TENSOR_CORES, fp8=capability >= _FP8_TENSOR_CORES)


CPU_FACTS = DeviceFacts("cpu", "CPU", None, tensor_cores=False, bf16=True, fp8=False)


def device_facts(device: str | torch.device | None = None) -> DeviceFacts:
    """The facts of `device` (default: the current GPU if there is one, else the CPU). Device
    types other than cpu and cuda are described by their name only (mixprec gives no advice)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        return CPU_FACTS
    if device.type != "cuda":
        return DeviceFacts(device.type, device.type, None, tensor_cores=False, bf16=False, fp8=False)
    return cuda_facts(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def recommended_precision(facts: DeviceFacts) -> tuple[str, str]:
    """(precision string, reason) for the device."""
    if facts.kind == "cpu":
        return "bf16-mixed", ("CPU: bf16 autocast is supported and needs no loss scaling; fp16 on CPUs is "
                              "usually slower than fp32")
    if facts.kind != "cuda":
        return "32-true", f"no advice for {facts.kind} devices: full precision is the safe choice"
    cap = facts.capability_str
    if facts.bf16:
        return "bf16-mixed", (f"compute capability {cap}: bf16 tensor cores run as fast as fp16, and bf16's "
                              "range needs no loss scaling")
    if facts.tensor_cores:
        return "16-mixed", (f"compute capability {cap}: fp16 tensor cores but no fast bf16; use fp16 "
                            "autocast with mixprec.GradScaler")
    return "32-true", "this GPU has no tensor cores: half precision saves memory but not time"


_HALF_PRECISIONS = {"16-mixed": torch.float16, "16-true": torch.float16,
                    "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16}


def precision_warning(facts: DeviceFacts, precision: str) -> str | None:
    """Why `precision` (a canonical mode name) is slow on this device, with the fix; None when
    it is not."""
    dtype = _HALF_PRECISIONS.get(precision)
    if dtype is None:
        return None
    if facts.kind == "cpu" and dtype is torch.float16:
        return (f"{precision} on CPU is slower than bf16-mixed (CPUs have no fast fp16 arithmetic, and "
                "fp16 needs loss scaling): use Precision('bf16-mixed')")
    if facts.kind != "cuda":
        return None
    cap = facts.capability_str
    if not facts.tensor_cores:
        return (f"{precision}: this GPU (compute capability {cap}) has no tensor cores, so half precision "
                "saves memory but not time; use Precision('32-true') for speed")
    if dtype is torch.bfloat16 and not facts.bf16:
        return (f"{precision}: compute capability {cap} has no bf16 tensor cores (bf16 is emulated and "
                "slow); use Precision('16-mixed')")
    return None
