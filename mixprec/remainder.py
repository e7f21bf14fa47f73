"""The remainder master weight: a bf16 weight plus the 16 low bits that bf16 drops (int16), which
together are an fp32 master bit for bit. The same split as the kernels' (compressed_state.h):
the weight is the master rounded to nearest with ties away from zero, the remainder the signed
difference of the bit patterns; NaN becomes bf16's canonical NaN with remainder 0."""
from __future__ import annotations

import torch
from torch import Tensor


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """(bf16 weight, int16 remainder) of an fp32 master."""
    bits = master.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    hi = (bits + 0x8000) >> 16
    lo = bits - (hi << 16)
    nan = torch.isnan(master)
    hi = torch.where(nan, torch.full_like(hi, 0x7FC0), hi)
    lo = torch.where(nan, torch.zeros_like(lo), lo)
    weight = torch.where(hi >= 0x8000, hi - 0x10000, hi).to(torch.int16).view(torch.bfloat16)
    return weight, lo.to(torch.int16)


def join_master(weight: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master of a bf16 weight and its int16 remainder."""
    hi = weight.detach().contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    bits = ((hi << 16) + remainder.to(torch.int64)) & 0xFFFFFFFF
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
