"""Shared hypothesis strategies and comparison helpers for the tests."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

import mixprec  # noqa: F401  (loads the ops)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}
# Sizes around SIMD widths, CUDA vector widths and chunk boundaries (64 KiB per chunk: 8192,
# 16384 and 32768 elements for fp64, fp32 and half types).
EDGE_SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 127, 129, 1023, 1025,
              8191, 8192, 8193, 16383, 16384, 16385, 32767, 32768, 32769, 65537]


def assert_bitwise_equal(ours: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Same dtype and shape, NaN in the same places, every other element bit for bit equal."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (what, ours.dtype, ref.dtype)
    ours, ref = ours.detach().cpu(), ref.detach().cpu()
    if not ours.is_floating_point():  # integer state (8-bit codes, remainders): plain equality
        assert torch.equal(ours, ref), f"{what}: {int((ours != ref).sum())} elements differ"
        return
    nan_o, nan_r = torch.isnan(ours), torch.isnan(ref)
    assert torch.equal(nan_o, nan_r), f"{what}: NaN positions differ"
    bits = _BITS[ours.dtype]
    keep = ~nan_o
    eq = ours.contiguous().view(bits)[keep] == ref.contiguous().view(bits)[keep]
    if not bool(eq.all()):
        bad = (~eq).nonzero()[0].item()
        raise AssertionError(f"{what}: {int((~eq).sum())} elements differ, first: "
                             f"{ours[keep][bad].item()!r} vs {ref[keep][bad].item()!r}")


@st.composite
def grad_tensor(draw, dtypes=tuple(FLOAT_DTYPES), device="cpu"):
    """One gradient-like tensor: any size incl. empty and chunk edges; contiguous, transposed,
    strided slice, or a view whose offset breaks 16-byte alignment; inf/-inf/NaN injected at
    the first, last or random positions."""
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.one_of(st.sampled_from(EDGE_SIZES), st.integers(0, 3000)))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "misaligned"]))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e2, 3e4]))
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(max(n, 1) * 2 + 3, generator=gen, dtype=torch.float64) * magnitude
    if layout == "contiguous" or n < 2:
        t = base[:n].clone()
    elif layout == "transposed":
        rows = next(r for r in (7, 5, 3, 2, 1) if n % r == 0)
        t = base[:n].clone().view(rows, n // rows).t()
    elif layout == "strided":
        t = base[: 2 * n].clone()[::2]
    else:
        t = base[: n + 1].clone()[1:]
    t = t.to(dtype)
    if layout == "misaligned" and n >= 1:  # re-create the offset view after the dtype cast
        t = torch.cat([torch.zeros(1, dtype=dtype), t])[1:]
    if n > 0:
        flat_positions = draw(st.lists(
            st.one_of(st.just(0), st.just(n - 1), st.integers(0, n - 1)), max_size=3))
        specials = [float("inf"), float("-inf"), float("nan")]
        flat = t.view(-1) if t.is_contiguous() else None
        for pos in flat_positions:
            value = draw(st.sampled_from(specials))
            if flat is not None:
                flat[pos] = value
            else:  # a non-contiguous view: index it by coordinates
                idx = torch.unravel_index(torch.tensor(pos), t.shape)
                t[tuple(int(i) for i in idx)] = value
    return t.to(device)


inv_scales = st.one_of(
    st.integers(-24, 24).map(lambda k: 2.0**k),
    st.just(1.0),
    st.floats(2.0**-24, 2.0**24, allow_nan=False, width=32),
)
