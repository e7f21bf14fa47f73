"""The mixprec ops against torch's own AMP ops (the oracle), plus opcheck and bad input."""
import math

import pytest
import torch
from helpers import FLOAT_DTYPES, assert_bitwise_equal, grad_tensor, inv_scales
from hypothesis import given
from hypothesis import strategies as st

from mixprec import ops

torch_unscale = torch._amp_foreach_non_finite_check_and_unscale_


def reference_unscale(grads, inv_scale, device):
    """torch's kernel on copies; bf16 on CUDA has no torch kernel, so use torch's CPU result."""
    out = [g.clone() for g in grads]
    found = torch.zeros((), device=device)
    on_cpu = device == "cuda" and any(g.dtype == torch.bfloat16 for g in grads)
    if on_cpu:
        out = [g.cpu() for g in out]
        found = found.cpu()
    by_dtype = {}
    for g in out:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        torch_unscale(group, found, torch.tensor(inv_scale, device=found.device))
    return out, found


@given(data=st.data(), inv_scale=inv_scales)
def test_unscale_matches_torch_bit_for_bit(device, data, inv_scale):
    grads = data.draw(st.lists(grad_tensor(device=device), min_size=0, max_size=6))
    expected, expected_found = reference_unscale(grads, inv_scale, device)
    found = torch.zeros((), device=device)
    ops.non_finite_check_and_unscale_(grads, found, torch.tensor(inv_scale, device=device))
    for i, (g, e) in enumerate(zip(grads, expected)):
        assert_bitwise_equal(g, e, f"grads[{i}] {g.dtype} {tuple(g.shape)} stride={g.stride()}")
    assert found.item() == expected_found.item()


def test_found_inf_is_sticky(device):
    """found_inf is only ever set to 1, never cleared: it accumulates over calls like torch's."""
    found = torch.ones((), device=device)
    ops.non_finite_check_and_unscale_([torch.ones(10, device=device)], found, torch.ones((), device=device))
    assert found.item() == 1.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_inf_found_at_every_position_of_a_chunk_boundary_tensor(device, dtype):
    n = 3 * 32768 + 5
    for pos in [0, 1, 8191, 8192, 16383, 16384, 32767, 32768, n - 1]:
        g = torch.ones(n, dtype=dtype, device=device)
        g[pos] = float("nan") if pos % 2 else float("inf")
        found = torch.zeros((), device=device)
        ops.non_finite_check_and_unscale_([g], found, torch.full((), 0.5, device=device))
        assert found.item() == 1.0, pos
        assert g[(pos + 1) % n].item() == 0.5


def test_more_than_2_31_elements():
    """Indices are int64 end to end: the last element of a 2^31 + 9 element tensor is reached."""
    n = 2**31 + 9
    try:
        g = torch.ones(n, dtype=torch.bfloat16)
    except RuntimeError as err:  # pragma: no cover - only on machines with < 5 GiB free
        pytest.fail(f"could not allocate the 4 GiB test tensor: {err}")
    g[-1] = float("inf")
    g[-2] = 4.0
    found = torch.zeros(())
    ops.non_finite_check_and_unscale_([g], found, torch.full((), 0.25))
    assert found.item() == 1.0
    assert g[-2].item() == 1.0 and g[0].item() == 0.25 and g[2**31].item() == 0.25
    del g


@given(found_infs=st.lists(st.sampled_from([0.0, 1.0, 2.0, float("nan")]), min_size=1, max_size=60),
       init_scale=st.one_of(st.integers(-10, 127).map(lambda k: 2.0**k),
                            st.floats(2.0**-100, 2.0**127, width=32)),
       growth_factor=st.sampled_from([2.0, 1.5, 1.0001, 4.0, 3.3]),
       backoff_factor=st.sampled_from([0.5, 0.25, 0.9, 0.3333]),
       growth_interval=st.integers(1, 5))
def test_update_scale_matches_torch_bit_for_bit(device, found_infs, init_scale, growth_factor,
                                                 backoff_factor, growth_interval):
    scale = torch.full((), init_scale, device=device)
    tracker = torch.zeros((), dtype=torch.int32, device=device)
    hyst = torch.ones((), dtype=torch.int32, device=device)
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    ref_scale, ref_tracker = scale.clone(), tracker.clone()
    for f in found_infs:
        found = torch.full((), f, device=device)
        ops.update_scale_(scale, tracker, hyst, counters, found, growth_factor, backoff_factor,
                          growth_interval)
        torch._amp_update_scale_(ref_scale, ref_tracker, found, growth_factor, backoff_factor,
                                 growth_interval)
        assert_bitwise_equal(scale, ref_scale, "scale")
        assert tracker.item() == ref_tracker.item()
    assert counters[0].item() == sum(1 for f in found_infs if f != 0)


def python_rule(state, found, growth_factor, backoff_factor, growth_interval, hysteresis,
                min_scale, max_scale):
    """The documented rule, in plain Python (float32 rounding via torch scalars)."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float64).float().item()
    scale, growth, hyst, skipped, at_min = state
    if found:
        skipped += 1
        at_min += scale <= min_scale
        growth = 0
        hyst = max(hyst - 1, 0)
        if hyst == 0:
            scale = max(f32(scale * backoff_factor), f32(min_scale))
    else:
        hyst = hysteresis
        if growth + 1 == growth_interval:
            grown = f32(scale * growth_factor)
            if math.isfinite(grown):
                scale = min(grown, f32(max_scale))
            growth = 0
        else:
            growth += 1
    return scale, growth, hyst, skipped, at_min


@given(found_infs=st.lists(st.booleans(), min_size=1, max_size=80),
       hysteresis=st.integers(1, 5), growth_interval=st.integers(1, 4),
       min_scale=st.sampled_from([0.0, 1.0, 2.0**10]),
       max_scale=st.sampled_from([math.inf, 2.0**16, 2.0**20]))
def test_update_scale_hysteresis_and_bounds_follow_the_rule(device, found_infs, hysteresis,
                                                            growth_interval, min_scale, max_scale):
    init = 2.0**14
    scale = torch.full((), init, device=device)
    tracker = torch.zeros((), dtype=torch.int32, device=device)
    hyst = torch.full((), hysteresis, dtype=torch.int32, device=device)
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    state = (init, 0, hysteresis, 0, 0)
    for f in found_infs:
        ops.update_scale_(scale, tracker, hyst, counters, torch.full((), float(f), device=device),
                          2.0, 0.5, growth_interval, hysteresis, min_scale, max_scale)
        state = python_rule(state, f, 2.0, 0.5, growth_interval, hysteresis, min_scale, max_scale)
        got = (scale.item(), tracker.item(), hyst.item(), *counters.tolist())
        assert got == state


def test_hysteresis_backs_off_only_after_n_consecutive_overflows(device):
    scale = torch.full((), 1024.0, device=device)
    tracker = torch.zeros((), dtype=torch.int32, device=device)
    hyst = torch.full((), 3, dtype=torch.int32, device=device)
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    seen = []
    for f in [1, 1, 0, 1, 1, 1, 1]:
        ops.update_scale_(scale, tracker, hyst, counters, torch.full((), float(f), device=device),
                          2.0, 0.5, 1000, 3, 0.0, math.inf)
        seen.append(scale.item())
    assert seen == [1024, 1024, 1024, 1024, 1024, 512, 256]


def _unscale_args(device):
    return ([torch.randn(100, device=device), torch.randn(33, device=device).half(),
             torch.randn(7, 5, device=device).bfloat16()],
            torch.zeros((), device=device), torch.full((), 0.5, device=device))


def test_opcheck(device):
    grads, found, inv = _unscale_args(device)
    torch.library.opcheck(torch.ops.mixprec.non_finite_check_and_unscale_.default, (grads, found, inv))
    args = (torch.full((), 8.0, device=device), torch.zeros((), dtype=torch.int32, device=device),
            torch.ones((), dtype=torch.int32, device=device),
            torch.zeros(2, dtype=torch.int64, device=device), torch.ones((), device=device),
            2.0, 0.5, 3, 1, 0.0, math.inf)
    torch.library.opcheck(torch.ops.mixprec.update_scale_.default, args)


def test_compiles_under_torch_compile(device):
    grads, found, inv = _unscale_args(device)
    grads[0][3] = float("inf")
    expected = [g.clone() for g in grads]
    torch_unscale(expected[:1], torch.zeros((), device=device), inv)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(gs, found, inv):
        ops.non_finite_check_and_unscale_(gs, found, inv)

    f(grads, found, inv)
    assert found.item() == 1.0
    assert_bitwise_equal(grads[0], expected[0])


BAD_INPUTS = {
    "int grad": (lambda d: [torch.ones(4, dtype=torch.int32, device=d)], None, None, "has dtype Int"),
    "complex grad": (lambda d: [torch.ones(4, dtype=torch.complex64, device=d)], None, None, "ComplexFloat"),
    "sparse grad": (lambda d: [torch.ones(4, device=d).to_sparse()], None, None, "Sparse"),
    "inv_scale fp64": (None, None, lambda d: torch.ones((), dtype=torch.float64, device=d), "inv_scale must be a Float"),
    "inv_scale 2 elements": (None, None, lambda d: torch.ones(2, device=d), "inv_scale must be a 1-element"),
    "found_inf int": (None, lambda d: torch.zeros((), dtype=torch.int32, device=d), None, "found_inf must be a Float"),
    "found_inf 3 elements": (None, lambda d: torch.zeros(3, device=d), None, "found_inf must be a 1-element"),
    "expanded grad": (lambda d: [torch.ones(1, device=d).expand(8)], None, None, "share memory"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_and_modifies_nothing(device, case):
    make_grads, make_found, make_inv, message = BAD_INPUTS[case]
    good = [torch.full((5,), 4.0, device=device)]
    extra = make_grads(device) if make_grads else []
    grads = good + extra  # the good grad comes first: it must not be touched either
    found = make_found(device) if make_found else torch.zeros((), device=device)
    inv = make_inv(device) if make_inv else torch.full((), 0.5, device=device)
    found_before = found.clone()
    with pytest.raises(RuntimeError, match=message):
        ops.non_finite_check_and_unscale_(grads, found, inv)
    assert torch.equal(good[0], torch.full((5,), 4.0, device=device))
    assert torch.equal(found, found_before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: mixes CPU and CUDA tensors")
def test_mixed_devices_raise_and_modify_nothing():
    cpu_grad = torch.full((5,), 4.0)
    with pytest.raises(RuntimeError, match="is on cpu but found_inf is on cuda"):
        ops.non_finite_check_and_unscale_([cpu_grad], torch.zeros((), device="cuda"),
                                          torch.ones((), device="cuda"))
    with pytest.raises(RuntimeError, match="inv_scale is on cpu but found_inf is on cuda"):
        ops.non_finite_check_and_unscale_([torch.ones(3, device="cuda")],
                                          torch.zeros((), device="cuda"), torch.ones(()))
    assert torch.equal(cpu_grad, torch.full((5,), 4.0))


def test_update_scale_bad_input(device):
    scale = torch.full((), 8.0, device=device)
    args = {"growth_tracker": torch.zeros((), dtype=torch.int32, device=device),
            "hysteresis_tracker": torch.ones((), dtype=torch.int32, device=device),
            "counters": torch.zeros(2, dtype=torch.int64, device=device),
            "found_inf": torch.ones((), device=device)}
    with pytest.raises(RuntimeError, match="growth_tracker must be a Int"):
        ops.update_scale_(scale, torch.zeros((), device=device), args["hysteresis_tracker"],
                          args["counters"], args["found_inf"], 2.0, 0.5, 3)
    with pytest.raises(RuntimeError, match="growth_interval must be >= 1"):
        ops.update_scale_(scale, *args.values(), 2.0, 0.5, 0)
    with pytest.raises(RuntimeError, match="hysteresis must be >= 1"):
        ops.update_scale_(scale, *args.values(), 2.0, 0.5, 3, 0)
    assert scale.item() == 8.0 and args["counters"].sum().item() == 0


f32s = st.floats(width=32, allow_nan=True, allow_infinity=True)


@given(norm=f32s, max_norm=st.one_of(st.floats(0.0, 1e4), f32s))
def test_clip_coef_matches_torch_formula_bit_for_bit(device, norm, max_norm):
    """clip_grad_norm_'s clamp(max_norm / (norm + 1e-6), max=1), run by torch on the same device."""
    total = torch.tensor(norm, device=device)
    expected = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    assert_bitwise_equal(ops.clip_coef(total, max_norm), expected)


def test_clip_coef_opcheck_and_errors(device):
    torch.library.opcheck(torch.ops.mixprec.clip_coef.default, (torch.tensor(3.0, device=device), 1.0))
    with pytest.raises(RuntimeError, match="total_norm"):
        ops.clip_coef(torch.tensor(3.0, device=device, dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match="total_norm"):
        ops.clip_coef(torch.ones(2, device=device), 1.0)


def test_fp32_reciprocal_equals_torch_amp_fp64_route(device):
    """torch.amp's inv_scale is scale.double().reciprocal().float(); our one-kernel fp32 reciprocal
    must give the same bits for every fp32 scale: 2^24 random bit patterns (all exponents,
    subnormals, infs and NaNs included) and every power of two."""
    from mixprec.loss_scaler import reciprocal_fp32
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 24,), generator=gen, dtype=torch.int64).to(torch.int32)
    powers = torch.tensor([2.0**e for e in range(-149, 128)], dtype=torch.float32).view(torch.int32)
    scales = torch.cat([bits, powers]).view(torch.float32).to(device)
    ours, torch_amp = reciprocal_fp32(scales), scales.double().reciprocal().float()
    same = (ours.view(torch.int32) == torch_amp.view(torch.int32)) | (ours.isnan() & torch_amp.isnan())
    assert bool(same.all()), scales[~same][:5]
