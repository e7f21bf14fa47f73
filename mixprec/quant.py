"""Block-wise 8-bit quantization of optimizer moments: the two 256-entry dynamic maps, the fp8
format, and the conversions between fp32 moments and (codes, absmax) that checkpoints use.

The maps follow Dettmers' dynamic quantization (arXiv 1511.04561), as bitsandbytes and torchao
use it for 8-bit Adam: a value x in a block of 256 is stored as the code of the map entry nearest
to x / absmax(block). Entries are dense near zero and sparse near one: level i (i = 0..6) covers
[0.1, 1] * 10^(i - 6) with the midpoints of an even split of that decade, 2^i of them for the
signed map (each with both signs: the first moment) and 2^(i+1) for the unsigned map (the second
moment, never negative); 0 and 1.0 complete each map to 256 entries.

fp8 moments (moments="fp8", as torchao's AdamWFp8 keeps them) are float8_e4m3fn values of
x * (256 / absmax) per block, read back as fp8 * (absmax / 256): a block's largest value maps to
256, below fp8's largest (448), so nothing saturates, and a block whose values all decay keeps its
codes while its absmax decays (a power-of-two scale would leave them stalled). The optimizer's
kernels give exactly the codes of encode_fp8 here, torch's own fp8 conversion
(csrc/include/mixprec/compressed_state.h's fp8_moment_ratio and fp8_moment_scale).
"""
from __future__ import annotations

import functools
from itertools import pairwise

import torch
from torch import Tensor

from mixprec import ops

QUANT_BLOCK = 256  # elements per absmax (csrc/include/mixprec/compressed_state.h's kQuantBlock)


def _dynamic_map(signed: bool) -> list[float]:
    values = [0.0, 1.0]
    for level in range(7):
        count = 2 ** level if signed else 2 ** (level + 1)
        edges = [0.1 + 0.9 * k / count for k in range(count + 1)]
        mids = [(a + b) / 2 * 10.0 ** (level - 6) for a, b in pairwise(edges)]
        values += mids + ([-m for m in mids] if signed else [])
    assert len(values) == 256
    return sorted(values)


@functools.cache
def _maps_on(device: str) -> tuple[Tensor, Tensor]:
    return tuple(torch.tensor(_dynamic_map(s), dtype=torch.float32, device=device) for s in (True, False))


def signed_map(device: torch.device | str = "cpu") -> Tensor:
    """The 256 sorted fp32 entries for values of either sign (Adam's exp_avg)."""
    return _maps_on(str(torch.device(device)))[0]


def unsigned_map(device: torch.device | str = "cpu") -> Tensor:
    """The 256 sorted fp32 entries for values >= 0 (Adam's exp_avg_sq)."""
    return _maps_on(str(torch.device(device)))[1]


def quantize(x: Tensor, *, signed: bool) -> tuple[Tensor, Tensor]:
    """(uint8 codes of x's shape, fp32 absmax per 256-element block of x's flat order). Refuses
    inf/NaN (8 bits cannot hold them) and negative values for the unsigned map."""
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor holding inf/NaN to 8 bits")
    if not signed and (x < 0).any():
        raise ValueError("the unsigned map (exp_avg_sq) takes values >= 0; got negative ones")
    qmap = signed_map(x.device) if signed else unsigned_map(x.device)
    return ops.quantize_blockwise(x.detach(), qmap)


def dequantize(codes: Tensor, absmax: Tensor, *, signed: bool) -> Tensor:
    """fp32 values of codes (the inverse of quantize, up to its rounding)."""
    qmap = signed_map(codes.device) if signed else unsigned_map(codes.device)
    return ops.dequantize_blockwise(codes, absmax, qmap)


def fp8_ratio(absmax: Tensor) -> Tensor:
    """256 / absmax per block (what a value is multiplied by before the fp8 conversion), at most
    2^127 (absmax <= 2^-119, zero included: see fp8_scale)."""
    return (256.0 / absmax.float()).clamp(max=2.0**127)


def fp8_scale(absmax: Tensor) -> Tensor:
    """absmax / 256 per block (what a code's fp8 value is multiplied by), at least 2^-127: the
    exact inverse of fp8_ratio in every block, the tiniest too."""
    return (absmax.float() * 2.0**-8).clamp(min=2.0**-127)


def _blocks(x: Tensor) -> Tensor:
    flat = x.detach().float().reshape(-1)
    padded = flat.new_zeros((flat.numel() + QUANT_BLOCK - 1) // QUANT_BLOCK * QUANT_BLOCK)
    padded[: flat.numel()] = flat
    return padded.view(-1, QUANT_BLOCK)


def encode_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """(float8_e4m3fn codes of x's shape, fp32 absmax per 256-element block of x's flat order):
    torch's fp8 conversion of x * fp8_ratio(absmax). Refuses inf/NaN, as quantize does."""
    if not torch.isfinite(x).all():
        raise ValueError("cannot store a tensor holding inf/NaN as fp8 moments")
    blocks = _blocks(x)
    absmax = blocks.abs().amax(dim=1)
    codes = (blocks * fp8_ratio(absmax)[:, None]).to(torch.float8_e4m3fn)
    return codes.reshape(-1)[: x.numel()].view(x.shape), absmax


def decode_fp8(codes: Tensor, absmax: Tensor) -> Tensor:
    """fp32 values of fp8 codes: code * fp8_scale(absmax) of its block (the inverse of encode_fp8,
    up to its rounding)."""
    flat = codes.reshape(-1).float()
    scale = fp8_scale(absmax).repeat_interleave(QUANT_BLOCK)[: flat.numel()]
    return (flat * scale).view(codes.shape)


# The block-scaled moment formats (one fp32 absmax per QUANT_BLOCK) and the dtype of their codes.
BLOCK_SCALED = {"8bit": torch.uint8, "fp8": torch.float8_e4m3fn}


def encode_moment(x: Tensor, moments: str, *, signed: bool) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of x in a block-scaled format of BLOCK_SCALED."""
    if moments == "fp8":
        if not signed and (x < 0).any():
            raise ValueError("a second moment (exp_avg_sq) takes values >= 0; got negative ones")
        return encode_fp8(x)
    return quantize(x, signed=signed)


def decode_moment(codes: Tensor, absmax: Tensor, *, signed: bool) -> Tensor:
    """fp32 values of block-scaled codes, the format told by their dtype."""
    if codes.dtype == torch.float8_e4m3fn:
        return decode_fp8(codes, absmax)
    return dequantize(codes, absmax, signed=signed)
