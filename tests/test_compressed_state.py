"""Compressed optimizer state (mixprec/optim.py, quant.py, remainder.py; the kernels'
adam_step_compressed_): the remainder master weight is the fp32 master bit for bit, 8-bit, fp8
and bf16 moments stay within their error bounds (fp8 codes are torch's own fp8 conversion), checkpoints convert both ways, and the bytes held per
param are what the modes promise."""
import copy

import pytest
import torch
from helpers import assert_bitwise_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec
from mixprec import ops, optim, quant
from mixprec.remainder import join_master, split_master


@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_remainder_split_joins_back_to_the_master_bit_for_bit(bits):
    """Every fp32 pattern (subnormals, inf, the largest finite) splits into a bf16 weight and an
    int16 remainder that join back exactly; the weight is round-to-nearest except on exact ties
    (rounded away from zero); NaN becomes a NaN weight."""
    x = torch.tensor(bits, dtype=torch.int64)
    x = torch.where(x >= 2**31, x - 2**32, x).to(torch.int32).view(torch.float32)
    weight, remainder = split_master(x)
    back = join_master(weight, remainder)
    nan = torch.isnan(x)
    assert torch.equal(back.view(torch.int32)[~nan], x.view(torch.int32)[~nan])
    assert torch.isnan(weight[nan]).all()
    low = (x.view(torch.int32) & 0xFFFF)[~nan]
    rne = x[~nan].bfloat16()
    not_tie = low != 0x8000
    assert torch.equal(weight[~nan][not_tie].view(torch.int16), rne[not_tie].view(torch.int16))


def _train(device, steps, shapes, seed, overflow_steps=(), **options):
    """bf16 params stepped by the same grads (independent of the weights) under a scaler with
    overflow steps; returns (params, optimizer)."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s).bfloat16().to(device)) for s in shapes]  # same on every device
    opt = optim.AdamW(params, lr=options.pop("lr", 1e-3), weight_decay=options.pop("weight_decay", 0.01), **options)
    scaler = mixprec.GradScaler(device, init_scale=2.0**8, growth_interval=50)
    scaler.scale(torch.zeros((), device=device))  # makes the scale, as the first scaled loss would
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen) * scaler.get_scale()
            if step in overflow_steps:
                g.view(-1)[0] = float("inf")
            p.grad = g.to(device).bfloat16()
        scaler.step(opt)
        scaler.update()
    return params, opt


@settings(max_examples=4, deadline=None)
@given(shapes=st.lists(st.sampled_from([(1,), (7, 3), (300,), (2, 257), (4100,)]), min_size=1, max_size=3),
       lr=st.sampled_from([1e-4, 1e-3, 1e-2]), weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
       overflow=st.sets(st.integers(0, 999), max_size=3), seed=st.integers(0, 2**16))
def test_remainder_equals_fp32_master_bit_for_bit_over_1000_steps(device, shapes, lr, weight_decay, overflow, seed):
    """master_weights='remainder' and master_weights=True take the same steps: after 1000 steps
    (with overflow steps skipped) the joined master equals the fp32 master bit for bit, and the
    weights agree except where the master's low 16 bits are an exact tie."""
    kwargs = {"lr": lr, "weight_decay": weight_decay}
    masters, m_opt = _train(device, 1000, shapes, seed, overflow, master_weights=True, **kwargs)
    remains, r_opt = _train(device, 1000, shapes, seed, overflow, master_weights="remainder", **kwargs)
    for pm, pr in zip(masters, remains):
        master = m_opt.state[pm]["master_param"]
        joined = join_master(pr.detach(), r_opt.state[pr]["master_remainder"])
        assert_bitwise_equal(joined, master, "master")
        tie = (master.view(torch.int32) & 0xFFFF) == 0x8000
        assert torch.equal(pr.detach().view(torch.int16)[~tie], pm.detach().view(torch.int16)[~tie])
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert_bitwise_equal(r_opt.state[pr][key], m_opt.state[pm][key], key)


def _map_half_gap(signed):
    """The farthest any y in [-1, 1] ([0, 1] unsigned) lies from its nearest map entry: half the
    widest gap, or the distance from an end of the range to the map's end (the signed map, as
    bitsandbytes', stops at -0.99297: y = -1 decodes 0.00703 away, a hair more than half a gap)."""
    m = quant.signed_map() if signed else quant.unsigned_map()
    lowest = -1.0 if signed else 0.0
    return max((m[1:] - m[:-1]).max().item() / 2, m[0].item() - lowest, 1.0 - m[-1].item())


@given(values=st.lists(st.floats(-(2.0**100), 2.0**100, width=32), min_size=1, max_size=600),
       outlier=st.sampled_from([0.0, 1e4, -1e4, 1e-30]), signed=st.booleans())
def test_quantize_blockwise_error_is_within_half_a_map_gap_per_block(device, values, outlier, signed):
    """|dequantize(quantize(x)) - x| <= half the map's widest gap times the block's absmax, for
    every block (zeros, huge outliers, subnormal-sized values); an all-zero block decodes to 0."""
    x = torch.tensor(values, dtype=torch.float32, device=device)
    x[len(values) // 2] = outlier
    if not signed:
        x = x.abs()
    codes, absmax = quant.quantize(x, signed=signed)
    back = quant.dequantize(codes, absmax, signed=signed)
    blocks = torch.arange(x.numel(), device=device) // quant.QUANT_BLOCK
    expect_absmax = torch.zeros_like(absmax).scatter_reduce(0, blocks, x.abs(), "amax")
    assert_bitwise_equal(absmax, expect_absmax, "absmax")
    bound = (_map_half_gap(signed) + 2.0**-23) * absmax[blocks]  # + the decode product's rounding
    assert ((back - x).abs() <= bound).all()
    assert (back[absmax[blocks] == 0] == 0).all()


def test_quantize_refuses_inf_nan_and_negative_second_moments():
    with pytest.raises(ValueError, match="inf/NaN"):
        quant.quantize(torch.tensor([1.0, float("nan")]), signed=True)
    with pytest.raises(ValueError, match="inf/NaN"):
        quant.quantize(torch.tensor([float("inf")]), signed=False)
    with pytest.raises(ValueError, match=">= 0"):
        quant.quantize(torch.tensor([-1.0]), signed=False)


# Both devices for the nearest-code tests, the CUDA one skipped (only it) where there is no GPU.
_QUANT_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="no CUDA device"))]


def _nearest_codes(x, qmap):
    """The plain reference of quantize_blockwise: per block y = x / absmax (0 where absmax is 0;
    NaN does not count toward absmax), then the entry with the least fp32 distance |entry - y|,
    the lower code on ties (argmin's first); a NaN y has NaN distances, so argmin gives code 0."""
    flat = x.reshape(-1)
    blocks = torch.arange(flat.numel()) // quant.QUANT_BLOCK
    magnitude = torch.where(flat.isnan(), 0.0, flat.abs())
    absmax = torch.zeros(int(blocks[-1]) + 1).scatter_reduce(0, blocks, magnitude, "amax")
    scale = absmax[blocks]
    y = torch.where(scale > 0, flat / scale, torch.zeros_like(flat))
    codes = torch.cat([(qmap - part[:, None]).abs().argmin(dim=1) for part in y.split(4096)])
    return codes.to(torch.uint8).reshape(x.shape), absmax


def _assert_nearest(x, signed, device):
    qmap = quant.signed_map() if signed else quant.unsigned_map()
    codes, absmax = ops.quantize_blockwise(x.to(device), qmap.to(device))
    expect_codes, expect_absmax = _nearest_codes(x, qmap)
    assert_bitwise_equal(absmax, expect_absmax, "absmax")
    wrong = (codes.cpu() != expect_codes).nonzero()
    assert wrong.numel() == 0, f"{wrong.numel()} codes differ, first at {x.view(-1)[wrong[0]].item()!r}"


def _exactly(values):
    """values (all |v| <= 1) laid out so that each block's absmax is exactly 1: y is the value."""
    v = torch.cat([values.reshape(-1), torch.zeros((-values.numel()) % 255)]).reshape(-1, 255)
    return torch.cat([torch.ones(v.shape[0], 1), v], dim=1).reshape(-1)


def _special_values(qmap):
    """Every entry, every neighbour midpoint (rounded to fp32, where the fp32 distances tie or
    nearly do), 2 fp32 steps either side of both, and the floor of every bucket of the kernel's
    index (exponent and top 6 mantissa bits of |y|, from 2^-23 to 1) with its fp32 neighbours;
    zeros, the subnormal and normal edges; both signs of all."""
    mids = ((qmap[1:].double() + qmap[:-1].double()) / 2).float()
    floors = torch.arange((127 - 23) << 6, (127 << 6) + 1, dtype=torch.int32).bitwise_left_shift(17).view(torch.float32)
    tiny = torch.tensor([0.0, 1e-45, 2e-45, 1e-40, 1.1754942e-38, 1.1754944e-38, 1.5e-38, 2.0**-22])
    v = torch.cat([qmap, mids, floors, tiny])
    for _ in range(2):
        v = torch.cat([v, torch.nextafter(v, torch.tensor(2.0)), torch.nextafter(v, torch.tensor(-2.0))])
    v = torch.cat([v, -v]).unique()
    return v[v.abs() <= 1]


@pytest.mark.parametrize("device", _QUANT_DEVICES)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_blockwise_gives_the_nearest_code_at_entries_ties_and_bucket_edges(device, signed):
    """The kernel's indexed search (a bucket of y's bits, then a short walk) gives the nearest
    entry, ties to the lower code, at every place it could slip: entries, midpoints, the index's
    bucket edges, +-0, +-1, subnormals (negative values too for the unsigned map: code 0)."""
    qmap = quant.signed_map() if signed else quant.unsigned_map()
    _assert_nearest(_exactly(_special_values(qmap)), signed, device)


@pytest.mark.parametrize("device", _QUANT_DEVICES)
def test_quantize_blockwise_nan_inf_and_all_zero_blocks(device):
    """A NaN (not part of absmax) gets code 0; an inf block's absmax is inf, so its finite values
    give y = +-0 and the infs y = NaN (code 0); an all-zero block (-0, or zeros and NaN) gives
    every element the code of 0. |y| > 1 cannot occur: absmax is the block's largest |x|."""
    nan, inf = float("nan"), float("inf")
    blocks = [[0.5, nan, -0.25, 1e-40], [inf, -inf, 3.0, -0.0, 1e-45], [-0.0, 0.0, -0.0], [nan, 0.0, -0.0]]
    x = torch.cat([torch.tensor(b + [0.0] * (quant.QUANT_BLOCK - len(b))) for b in blocks])
    for signed in (True, False):
        _assert_nearest(x, signed, device)


@pytest.mark.parametrize("device", _QUANT_DEVICES)
@given(values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=False), min_size=1, max_size=700),
       scale=st.sampled_from([1.0, 2.0**-126, 2.0**-140, 1e30]), signed=st.booleans())
def test_quantize_blockwise_gives_the_nearest_code_for_any_values(device, values, scale, signed):
    """Random fp32 values (subnormals, beyond 1, NaN; scaled into the subnormal range or up),
    and the same values as y exactly (blocks whose absmax is 1): codes and absmax equal the
    reference's on both maps."""
    x = torch.tensor(values, dtype=torch.float32) * scale
    _assert_nearest(x, signed, device)
    y = torch.tensor(values, dtype=torch.float32)
    y = y[y.abs() <= 1]
    if y.numel():
        _assert_nearest(_exactly(y), signed, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares CPU and CUDA kernels")
@given(n=st.integers(1, 2000), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e30]), seed=st.integers(0, 2**16))
def test_quantize_blockwise_cpu_and_cuda_agree_bit_for_bit(n, scale, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    for signed in (True, False):
        v = x if signed else x.abs()
        qmap = quant.signed_map() if signed else quant.unsigned_map()
        cpu = ops.quantize_blockwise(v, qmap)
        cuda = ops.quantize_blockwise(v.cuda(), qmap.cuda())
        assert torch.equal(cpu[0], cuda[0].cpu()) and torch.equal(cpu[1], cuda[1].cpu())
        assert torch.equal(ops.dequantize_blockwise(*cpu, qmap), ops.dequantize_blockwise(*cuda, qmap.cuda()).cpu())


def test_bf16_second_moment_stalls_rounded_to_nearest_and_decays_stochastically(device):
    """Why bf16 moments are rounded stochastically: with zero grads exp_avg_sq should decay by
    beta2 = 0.999 a step. Rounded to nearest it never moves (0.1 % is below half a bf16 ulp);
    ours decays like fp32 does, within 2 %, over 300 steps."""
    v0 = torch.rand(4096, device=device) + 0.5
    assert torch.equal((v0.bfloat16().float() * 0.999).bfloat16(), v0.bfloat16())  # nearest: stuck
    p = torch.nn.Parameter(torch.zeros(4096, device=device, dtype=torch.bfloat16))
    opt = optim.AdamW([p], lr=0.0, weight_decay=0.0, moments="bf16", master_weights=False, rounding="stochastic")
    p.grad = torch.zeros_like(p)
    opt.step()
    opt.state[p]["exp_avg_sq"].copy_(v0.bfloat16())
    for _ in range(300):
        opt.step()
    ratio = (opt.state[p]["exp_avg_sq"].float().mean() / (v0.bfloat16().float().mean() * 0.999**300)).item()
    assert abs(ratio - 1) < 0.02, ratio


MODES = [{"moments": "8bit", "master_weights": "remainder"}, {"moments": "bf16", "master_weights": True},
         {"moments": "8bit", "master_weights": False, "rounding": "stochastic"},
         {"moments": "fp32", "master_weights": "remainder"},
         {"moments": "fp8", "master_weights": "remainder"},
         {"moments": "fp8", "master_weights": False, "rounding": "stochastic"}]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_compressed_modes_track_fp32_adamw(device, mode):
    """200 steps on a regression problem in bf16: every compressed mode ends within 15 % of the
    loss of AdamW with fp32 master weights and moments (benchmarks/convergence_bf16.py measures
    the longer run)."""
    def run(make):
        torch.manual_seed(0)
        x, w_true = torch.randn(512, 64, device=device), torch.randn(64, 1, device=device)
        y = x @ w_true
        model = torch.nn.Linear(64, 1, bias=False, device=device)
        model, opt = make(model)
        for _ in range(200):
            loss = (model(x.to(model.weight.dtype)).float() - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    ref = run(lambda m: (m.bfloat16(), optim.AdamW(m.parameters(), lr=1e-2)))
    ours = run(lambda m: (m.bfloat16(), optim.AdamW(m.parameters(), lr=1e-2, **mode)))
    assert ours <= ref * 1.15 + 1e-3, (ours, ref)


@pytest.mark.parametrize("moments", ["8bit", "fp8"])
def test_held_bytes_per_param(device, moments):
    """bf16 weight + remainder + 8-bit (or fp8) moments holds 6 bytes per param and 4 without a
    master (plus 8 bytes of absmax per 256 params), counted from the allocated tensors."""
    p = torch.nn.Parameter(torch.randn(256 * 1000, device=device).bfloat16())
    for options, expected in (({"master_weights": "remainder"}, 6.0),
                              ({"master_weights": False, "rounding": "stochastic"}, 4.0)):
        opt = optim.AdamW([p], moments=moments, **options)
        p.grad = torch.randn_like(p)
        opt.step()
        held = p.numel() * 2 + sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
        assert held / p.numel() == pytest.approx(expected + 8 / 256)


def test_torch_checkpoint_loads_quantized_and_exports_back(device):
    """torch.optim.AdamW's checkpoint loads into 8-bit moments (the codes quantize() gives), and
    to_torch_state_dict() loads into torch.optim.AdamW with the moments within the map's error."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(300, 4, device=device)
    t_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref(torch.randn(8, 300, device=device)).square().mean().backward()
    t_opt.step()
    model = copy.deepcopy(ref)
    opt = optim.AdamW(model.parameters(), lr=1e-2, moments="8bit")
    opt.load_state_dict(t_opt.state_dict())
    for p, pr in zip(model.parameters(), ref.parameters()):
        codes, absmax = quant.quantize(t_opt.state[pr]["exp_avg"], signed=True)
        assert torch.equal(opt.state[p]["exp_avg"], codes) and torch.equal(opt.state[p]["exp_avg_absmax"], absmax)
    exported = optim.to_torch_state_dict(opt)
    back = torch.optim.AdamW(copy.deepcopy(ref).parameters(), lr=1e-2)
    back.load_state_dict(exported)
    for (i, s), pr in zip(back.state.items(), ref.parameters()):
        m = t_opt.state[pr]["exp_avg"]
        assert (s["exp_avg"] - m).abs().max() <= _map_half_gap(True) * m.abs().max() * 1.01


@pytest.mark.parametrize("moments", ["8bit", "fp8"])
def test_compressed_state_dict_round_trips_and_steps_the_same(device, moments):
    """state_dict of a remainder + 8-bit (or fp8) optimizer loads into a fresh one: the next step
    is bit for bit the same as the original's."""
    params, opt = _train(device, 5, [(300,), (7, 3)], 0, moments=moments, master_weights="remainder")
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    twins = [torch.nn.Parameter(p.clone()) for p in saved_params]
    twin_opt = optim.AdamW(twins, lr=1e-3, weight_decay=0.01, moments=moments, master_weights="remainder")
    twin_opt.load_state_dict(saved)
    for group in (params, twins):
        for p in group:
            p.grad = torch.ones_like(p)
    opt.step()
    twin_opt.step()
    for a, b in zip(params, twins):
        assert_bitwise_equal(a.detach(), b.detach(), "param")
        for key, value in opt.state[a].items():
            assert_bitwise_equal(twin_opt.state[b][key], value, key)


@pytest.mark.parametrize("moments", ["8bit", "fp8"])
def test_bad_compressed_state_is_refused_before_anything_changes(device, moments):
    params, opt = _train(device, 2, [(300,)], 0, moments=moments, master_weights="remainder")
    good = copy.deepcopy(opt.state_dict())
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    bad_cases = []
    no_absmax = copy.deepcopy(good)
    del no_absmax["state"][0]["exp_avg_absmax"]
    bad_cases.append((no_absmax, "exp_avg_absmax"))
    nan_fp32 = copy.deepcopy(good)
    nan_fp32["state"][0]["exp_avg"] = torch.full((300,), float("nan"), device=device)
    bad_cases.append((nan_fp32, "inf/NaN"))
    bad_remainder = copy.deepcopy(good)
    bad_remainder["state"][0]["master_remainder"] = torch.zeros(300, device=device)
    bad_cases.append((bad_remainder, "int16"))
    nan_absmax = copy.deepcopy(good)
    nan_absmax["state"][0]["exp_avg_sq_absmax"][1] = float("nan")
    bad_cases.append((nan_absmax, "exp_avg_sq_absmax.*inf/NaN or negative"))
    negative_absmax = copy.deepcopy(good)
    negative_absmax["state"][0]["exp_avg_absmax"][0] = -1.0
    bad_cases.append((negative_absmax, "exp_avg_absmax.*inf/NaN or negative"))
    if moments == "fp8":
        nan_code = copy.deepcopy(good)
        nan_code["state"][0]["exp_avg"].view(torch.uint8)[5] = 0x7F
        bad_cases.append((nan_code, "NaN codes"))
        bad_cases += fp8_checkpoints_that_would_reach_the_weights(good)
    for state_dict, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(state_dict)
        for k, v in opt.state[params[0]].items():
            assert_bitwise_equal(v, before[k], k)


def fp8_checkpoints_that_would_reach_the_weights(good):
    """fp8 checkpoints with finite codes that pass as codes but not as moments: a negative second
    moment (NaN from its square root at the next step) and a code whose value overflows fp32 once
    scaled by its block's absmax / 256 (inf). (A NaN code and a bad absmax are cases of their own.)"""
    negative_v = copy.deepcopy(good)
    negative_v["state"][0]["exp_avg_sq"][7] = -1.0
    overflowing = copy.deepcopy(good)
    overflowing["state"][0]["exp_avg_absmax"][0] = 3e38
    overflowing["state"][0]["exp_avg"][0] = 448.0
    return [(negative_v, "negative codes"), (overflowing, "decodes to inf")]


@pytest.mark.parametrize("moments", ["fp32", "8bit", "bf16"])
def test_a_bad_fp8_checkpoint_leaves_an_optimizer_of_another_format_untouched(device, moments):
    """Loading converts fp8 moments to the optimizer's own format after the checks: a checkpoint
    the conversion could not take (8-bit quantization refuses inf and negative second moments) is
    refused by the checks, before anything changes, whatever the format it would convert to."""
    _, fp8_opt = _train(device, 2, [(300,)], 0, moments="fp8", master_weights="remainder")
    params, opt = _train(device, 2, [(300,)], 0, moments=moments, master_weights="remainder")
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    for state_dict, message in fp8_checkpoints_that_would_reach_the_weights(fp8_opt.state_dict()):
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(state_dict)
        assert opt.state[params[0]].keys() == before.keys()
        for k, v in opt.state[params[0]].items():
            assert_bitwise_equal(v, before[k], k)


def test_options_are_checked_at_construction():
    p = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="moments must be one of"):
        optim.AdamW(p, moments="4bit")
    with pytest.raises(ValueError, match="amsgrad"):
        optim.AdamW(p, moments="8bit", amsgrad=True)
    with pytest.raises(ValueError, match="kahan"):
        optim.AdamW(p, moments="bf16", master_weights=False, rounding="kahan")
    with pytest.raises(ValueError, match="bfloat16 params"):
        optim.AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))], master_weights="remainder")
    with pytest.raises(ValueError, match="master_weights must be"):
        optim.AdamW(p, master_weights="fp32")


def test_storage_names_agree_with_the_kernels():
    p = [torch.zeros(3, dtype=torch.bfloat16)]
    sm, um = quant.signed_map(), quant.unsigned_map()
    for bad in ({"moments": "int4", "weights": "plain"}, {"moments": "bf16", "weights": "kahan"}):
        with pytest.raises(ValueError, match="must be one of 'fp32', 'bf16', '8bit'|'plain', 'master', 'remainder'"):
            ops.adam_step_compressed_(p, [torch.zeros_like(p[0])], [torch.zeros(3, dtype=torch.bfloat16)] * 1,
                                      [torch.zeros(3, dtype=torch.bfloat16)], [], [], [], [], [torch.zeros(())],
                                      lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                      decoupled_weight_decay=True, maximize=False, signed_map=sm, unsigned_map=um,
                                      **bad)
    assert ops.MOMENT_STORAGES == tuple(optim.MOMENT_DTYPES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares CPU and CUDA kernels")
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_compressed_step_on_cuda_agrees_with_the_cpu(mode):
    """The same step on both devices: the Adam maths differ by the devices' roundings (a few
    fp32 ulps), so weights agree within a bf16 ulp and decoded moments within one map gap of
    their block's absmax (a code may flip at a rounding boundary)."""
    results = []
    for device in ("cpu", "cuda"):
        # (4100,): 17 blocks, so a CUDA warp steps several on the vector path and ends on a tail
        params, opt = _train(device, 20, [(300,), (7, 3), (4100,)], 3, **dict(mode))
        results.append((params, opt))
    (pc, oc), (pg, og) = results
    for a, b in zip(pc, pg):
        torch.testing.assert_close(b.detach().cpu().float(), a.detach().float(), rtol=2**-7, atol=1e-6)
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            sa, sb = oc.state[a], og.state[b]
            if sa[key].dtype in quant.BLOCK_SCALED.values():
                da = quant.decode_moment(sa[key], sa[key + "_absmax"], signed=signed)
                db = quant.decode_moment(sb[key].cpu(), sb[key + "_absmax"].cpu(), signed=signed)
                # one step of the map, or of fp8 at the top of a block (16 in [128, 256): 1/8)
                step = 2 * _map_half_gap(signed) if sa[key].dtype == torch.uint8 else 1 / 8
                assert (da - db).abs().max() <= step * sa[key + "_absmax"].max() * 1.01, key
            else:
                torch.testing.assert_close(sb[key].cpu().float(), sa[key].float(), rtol=2**-7, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel's two paths")
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
@pytest.mark.parametrize("path", ["1", "2", "3"])
def test_cuda_whole_block_path_equals_the_general_path_bit_for_bit(mode, path, monkeypatch):
    """A 16-byte aligned tensor takes the straight-line path for its whole blocks (path 1, with
    Adam's bias correction divided by its reciprocal; path 2 adds the loop-free code walk, path 3
    the 8-bit ratio by a reciprocal a block: MIXPREC_COMPRESSED_PATH, an experiment's switch); the
    same values in a view one element in (misaligned) take the general path for every block. Both
    are the same maths, so the weights and every state tensor agree bit for bit over several steps,
    overflowing, infinite and NaN gradients included."""
    monkeypatch.setenv("MIXPREC_COMPRESSED_PATH", path)
    n, steps = 4100, 4  # 16 whole blocks and a tail
    torch.manual_seed(0)
    init = torch.randn(n, device="cuda").bfloat16()
    grads = [torch.randn(n, device="cuda").bfloat16() for _ in range(steps)]
    # In some blocks: a square that overflows (an infinite root, passed through by the
    # reciprocal's divider), inf and NaN (NaN moments take code 0 on both walks).
    for index, value in ((700, 3e19), (1000, -3e19), (1500, float("inf")), (2100, float("nan"))):
        grads[1][index] = value
    results = []
    for offset in (0, 1):
        weight_storage = torch.zeros(n + offset, device="cuda", dtype=torch.bfloat16)
        weight_storage[offset:] = init
        p = torch.nn.Parameter(weight_storage[offset:])
        assert (p.data_ptr() % 16 == 0) == (offset == 0)
        opt = optim.AdamW([p], lr=1e-2, weight_decay=0.01, **dict(mode))
        grad_storage = torch.zeros(n + offset, device="cuda", dtype=torch.bfloat16)
        for g in grads:
            grad_storage[offset:] = g
            p.grad = grad_storage[offset:]
            opt.step()
        results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}))
    (pa, sa), (pm, sm) = results
    assert_bitwise_equal(pm, pa, "weight")
    assert sa.keys() == sm.keys()
    for key in sa:
        assert_bitwise_equal(sm[key], sa[key], key)


@pytest.mark.parametrize("moments", ["8bit", "fp8"])
def test_precision_bf16_true_builds_compressed_state_from_the_exact_fp32_weights(moments):
    """Precision("bf16-true", master_weights="remainder", moments="8bit").setup() turns torch's
    AdamW into ours with that state; the remainder starts from the exact fp32 weights (joined
    back bit for bit). The options refuse SGD and modes without bf16 weights, naming the fix."""
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 4)
    fp32 = [p.detach().clone() for p in model.parameters()]
    prec = mixprec.Precision("bf16-true", master_weights="remainder", moments=moments, device="cpu")
    model, opt = prec.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert isinstance(opt, optim.AdamW) and opt.param_groups[0]["moments"] == moments
    for p, value in zip(model.parameters(), fp32):
        assert p.dtype == torch.bfloat16
        assert_bitwise_equal(join_master(p.detach(), opt.state[p]["master_remainder"]), value, "seeded master")
    model(torch.randn(2, 300)).float().square().mean().backward()
    opt.step()
    assert opt.state[model.weight]["exp_avg"].dtype == optim.MOMENT_DTYPES[moments]
    with pytest.raises(ValueError, match="Adam/AdamW"):
        mixprec.Precision("bf16-true", moments="8bit", device="cpu").setup(
            torch.nn.Linear(3, 3), torch.optim.SGD(torch.nn.Linear(3, 3).parameters(), lr=0.1))
    with pytest.raises(ValueError, match="bf16"):
        mixprec.Precision("16-true", master_weights="remainder")
    with pytest.raises(ValueError, match="compressed optimizer state"):
        mixprec.Precision("bf16-mixed", moments="8bit")
    with pytest.raises(ValueError, match="Adam/AdamW"):
        optim.SGD([torch.nn.Parameter(torch.zeros(3))], master_weights="remainder")


def test_step_in_backward_equals_step_after_backward_and_frees_each_grad(device):
    """step_in_backward steps every param inside backward, bit for bit as backward + step(), and
    no grad is left afterwards (so the model's grads never all exist at once)."""
    def model_and_opt():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.GELU(), torch.nn.Linear(300, 8)).to(device)
        model = model.bfloat16()
        return model, optim.AdamW(model.parameters(), lr=1e-2, master_weights="remainder", moments="8bit")

    x = torch.randn(16, 64, device=device, dtype=torch.bfloat16)
    ref, ref_opt = model_and_opt()
    ours, opt = model_and_opt()
    remove = optim.step_in_backward(opt)
    for _ in range(3):
        ref(x).float().square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ours(x).float().square().mean().backward()
        assert all(p.grad is None for p in ours.parameters())
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert_bitwise_equal(a, b, "param")
    remove()
    ours(x).float().square().mean().backward()
    assert all(p.grad is not None for p in ours.parameters())


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_an_overflowing_step_changes_nothing(device, mode):
    """A scaler's found_inf skips the compressed step on the device: weights, remainders, codes,
    absmax and step counts stay as they were (and the grads keep their values)."""
    params, opt = _train(device, 3, [(300,), (7, 3)], 1, **dict(mode))
    scaler = mixprec.GradScaler(device, init_scale=2.0**8)
    scaler.scale(torch.zeros((), device=device))
    before = {k: v.clone() for p in params for k, v in [(f"{id(p)}:w", p.detach())]
              + [(f"{id(p)}:{key}", t) for key, t in opt.state[p].items()]}
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad.view(-1)[2] = float("inf")
    scaler.step(opt)
    for p in params:
        assert_bitwise_equal(p.detach(), before[f"{id(p)}:w"], "weight")
        for key, t in opt.state[p].items():
            assert_bitwise_equal(t, before[f"{id(p)}:{key}"], key)


def test_folded_clip_with_the_remainder_equals_fp32_masters(device):
    """scaler.clip_grad_norm_ hands the clip to the compressed step as to the plain one: the
    remainder's joined masters equal master_weights=True's bit for bit under clipping."""
    runs = []
    for master in (True, "remainder"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300).bfloat16().to(device))]
        opt = optim.AdamW(params, lr=1e-2, master_weights=master)
        scaler = mixprec.GradScaler(device, init_scale=2.0**8)
        scaler.scale(torch.zeros((), device=device))
        gen = torch.Generator().manual_seed(2)
        for _ in range(5):
            params[0].grad = (torch.randn(300, generator=gen) * 10 * scaler.get_scale()).bfloat16().to(device)
            scaler.clip_grad_norm_(opt, 0.5)
            scaler.step(opt)
            scaler.update()
        state = opt.state[params[0]]
        runs.append(state["master_param"] if master is True else join_master(params[0].detach(), state["master_remainder"]))
    assert_bitwise_equal(runs[1], runs[0], "clipped masters")


def test_the_step_allocates_no_copy_of_the_state():
    """Decoding and encoding happen in registers: after the first step (which makes the state)
    a step allocates nothing the size of the state, so the peak is the persistent state."""
    from mixprec.bench import peak_memory

    p = torch.nn.Parameter(torch.randn(256 * 400).bfloat16())
    opt = optim.AdamW([p], master_weights="remainder", moments="8bit")
    p.grad = torch.randn_like(p)
    opt.step()
    with peak_memory(torch.device("cpu")) as peak:
        opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[p].values())
    assert peak.bytes is not None and peak.bytes < 0.01 * state_bytes, (peak.bytes, state_bytes)


def test_moments_stay_what_the_optimizer_was_built_with_on_load():
    """Loading a checkpoint of ours saved with fp32 moments into an 8-bit optimizer (and back)
    converts the moments: the format is the loading optimizer's, not the checkpoint's."""
    params, opt = _train("cpu", 3, [(300,)], 0, master_weights="remainder")
    saved = opt.state_dict()
    twin = [torch.nn.Parameter(params[0].detach().clone())]
    eight = optim.AdamW(twin, moments="8bit", master_weights="remainder")
    eight.load_state_dict(saved)
    assert eight.param_groups[0]["moments"] == "8bit" and eight.state[twin[0]]["exp_avg"].dtype == torch.uint8
    back = optim.AdamW([torch.nn.Parameter(params[0].detach().clone())], master_weights="remainder")
    back.load_state_dict(eight.state_dict())
    state = next(iter(back.state.values()))
    assert back.param_groups[0]["moments"] == "fp32" and state["exp_avg"].dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(1,), (255,), (256,), (7, 37), (1000,)]),
       scales=st.lists(st.sampled_from([0.0, 1e-30, 1e-19, 1e-8, 1e-3, 1.0, 3e4, 1e15]), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_fp8_moments_are_torchs_fp8_conversion(device, shape, scales, seed):
    """With betas (0, 0) a step's moments are exactly the grad and its square, so the kernel's
    codes must be torch's float8_e4m3fn conversion of them times 256 / their block's absmax
    (quant.encode_fp8), and the absmax theirs, bit for bit: blocks of zeros, of values so small
    that the ratio overflows (clamped to FLT_MAX) and of large ones included."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen)
    flat = g.view(-1)
    for i, scale in enumerate(scales):  # each scale over its own stretch, crossing block edges
        part = slice(i * flat.numel() // len(scales), (i + 1) * flat.numel() // len(scales))
        flat[part] *= scale
    p = torch.nn.Parameter(torch.zeros(shape, device=device))
    opt = optim.AdamW([p], lr=1e-3, betas=(0.0, 0.0), weight_decay=0.0, moments="fp8")
    p.grad = g.to(device)
    opt.step()
    state = opt.state[p]
    for key, value in (("exp_avg", g), ("exp_avg_sq", g * g)):
        codes, absmax = quant.encode_fp8(value)
        assert_bitwise_equal(state[key].cpu().view(torch.uint8), codes.view(torch.uint8), key)
        assert_bitwise_equal(state[key + "_absmax"].cpu(), absmax, key + "_absmax")


def test_fp8_decode_error_is_within_half_an_fp8_step():
    """Decoded fp8 moments are within 1/16 of the value (3 mantissa bits, rounded to nearest) in
    fp8's normal range (down to 2^-6 of 256: absmax / 2^14), and within half fp8's smallest step
    (2^-10 of 256) below it; the fp32 roundings of the ratio and the products add ulps."""
    x = torch.randn(4096) * torch.logspace(-12, 0, 4096)
    codes, absmax = quant.encode_fp8(x)
    back = quant.decode_fp8(codes, absmax)
    top = absmax.repeat_interleave(quant.QUANT_BLOCK)[: x.numel()]
    bound = torch.maximum(x.abs() / 16, 2.0**-10 * top / 256)
    assert ((back - x).abs() <= bound * (1 + 2.0**-18)).all()


def test_saved_moments_convert_between_8bit_and_fp8():
    """A checkpoint of 8-bit moments loads into an fp8 optimizer (decoded, then encoded as fp8)
    and back; torch.optim's loads into fp8 as encode_fp8 gives it, and exports within fp8's step."""
    params, opt = _train("cpu", 3, [(300,)], 0, master_weights="remainder", moments="8bit")
    fp8 = optim.AdamW([torch.nn.Parameter(params[0].detach().clone())], moments="fp8", master_weights="remainder")
    fp8.load_state_dict(opt.state_dict())
    state = next(iter(fp8.state.values()))
    decoded = quant.dequantize(opt.state[params[0]]["exp_avg"], opt.state[params[0]]["exp_avg_absmax"], signed=True)
    codes, absmax = quant.encode_fp8(decoded)
    assert state["exp_avg"].dtype == torch.float8_e4m3fn
    assert_bitwise_equal(state["exp_avg"].view(torch.uint8), codes.view(torch.uint8), "exp_avg")
    assert_bitwise_equal(state["exp_avg_absmax"], absmax, "exp_avg_absmax")
    eight = optim.AdamW([torch.nn.Parameter(params[0].detach().clone())], moments="8bit", master_weights="remainder")
    eight.load_state_dict(fp8.state_dict())
    assert next(iter(eight.state.values()))["exp_avg"].dtype == torch.uint8
    exported = optim.to_torch_state_dict(fp8)["state"][0]["exp_avg"]
    assert exported.dtype == torch.float32
    assert (exported - decoded).abs().max() <= decoded.abs().max() / 16 * 1.01


def test_fp8_codes_at_every_fp8_value_and_tie():
    """Every fp8 value below 256, every midpoint between two (a tie: nearest even wins) and the
    fp32 neighbours of both, either sign, in blocks whose absmax (256) makes the ratio 1: the
    step's codes are torch's float8_e4m3fn conversion bit for bit, as are its squares'."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values) & (values >= 0) & (values < 256)].sort().values
    mids = (values[1:] + values[:-1]) / 2
    points = torch.cat([values, mids])
    points = torch.cat([points, torch.nextafter(points, torch.tensor(-1.0)), torch.nextafter(points, torch.tensor(300.0))])
    points = points[(points >= 0) & (points < 256)]
    points = torch.cat([points, -points])
    blocks = (points.numel() + 254) // 255
    rest = torch.zeros(blocks * 255)
    rest[: points.numel()] = points
    g = torch.cat([torch.full((blocks, 1), 256.0), rest.view(blocks, 255)], dim=1)  # absmax 256: ratio 1
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        p = torch.nn.Parameter(torch.zeros(g.shape, device=device))
        opt = optim.AdamW([p], lr=1e-3, betas=(0.0, 0.0), weight_decay=0.0, moments="fp8")
        p.grad = g.to(device)
        opt.step()
        for key, value in (("exp_avg", g), ("exp_avg_sq", g * g)):
            codes, _ = quant.encode_fp8(value)
            assert_bitwise_equal(opt.state[p][key].cpu().view(torch.uint8), codes.view(torch.uint8), f"{device} {key}")
        assert torch.equal(quant.fp8_ratio(opt.state[p]["exp_avg_absmax"].cpu()), torch.ones(blocks))


@pytest.mark.parametrize("tiny", [1e-36, 1e-38])
def test_fp8_moments_of_a_block_below_2_pow_minus_119_come_back(device, tiny):
    """A block whose absmax is at most 2^-119 (where 256 / absmax reaches 2^127) is encoded times
    2^127 and decoded times 2^-127, the exact inverse: its values come back within fp8's rounding
    (decoding by absmax / 256 there shrank them to 1.4 % at absmax 1e-38), in quant and in the
    step, whose first moment then halves each step under zero grads with beta1 = 0.5 (a block's
    largest value no longer lands on 256 there, so fp8 rounds it)."""
    x = torch.full((256,), tiny)
    x[1::2] = -tiny / 2
    codes, absmax = quant.encode_fp8(x)
    torch.testing.assert_close(quant.decode_fp8(codes, absmax), x, rtol=2**-4, atol=0)
    p = torch.nn.Parameter(torch.zeros(256, device=device))
    opt = optim.AdamW([p], lr=1e-3, betas=(0.5, 0.999), weight_decay=0.0, moments="fp8")
    p.grad = torch.full((256,), tiny, device=device)
    for step in range(4):
        opt.step()
        p.grad.zero_()
        m = quant.decode_fp8(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_absmax"]).cpu().double()
        torch.testing.assert_close(m, torch.full((256,), tiny * 0.5 ** (step + 1), dtype=torch.float64),
                                   rtol=2**-4, atol=0)  # one fp8 rounding: halving is exact


@pytest.mark.parametrize("moments", ["8bit", "fp8"])
def test_block_scaled_moments_decay_under_zero_grads(device, moments):
    """After one step, 300 steps with zero grads: each moment decays by its beta a step, as fp32
    moments do, instead of stalling where a decayed value rounds back to its own code: the
    block's absmax carries the decay, the codes stay. (The signed 8-bit map ends at -0.99297, so
    a block whose largest first moment is negative loses up to 0.7 % more a step.)"""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000, device=device))
    opt = optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, moments=moments)
    p.grad = torch.randn(1000, device=device)
    opt.step()
    state = opt.state[p]
    first = [quant.decode_moment(state[k].cpu(), state[k + "_absmax"].cpu(), signed=k == "exp_avg").abs().max()
             for k in ("exp_avg", "exp_avg_sq")]
    p.grad = torch.zeros_like(p)
    for _ in range(300):
        opt.step()
    for key, beta, before in (("exp_avg", 0.9, first[0]), ("exp_avg_sq", 0.99, first[1])):
        now = quant.decode_moment(state[key].cpu(), state[key + "_absmax"].cpu(), signed=key == "exp_avg").abs().max()
        expected = before * beta**300
        slowest = 1.0 if moments == "fp8" or key == "exp_avg_sq" else 0.99297**300
        assert 0.9 * slowest * expected <= now <= 1.1 * expected, (key, now, expected)
