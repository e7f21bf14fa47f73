"""mixprec.clipping: the public hand-over of clipping between GradScaler, the optimizers and
Precision. torch.amp's recipe (unscale_ + torch.nn.utils.clip_grad_norm_ + step) is the oracle."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec
from mixprec import optim
from mixprec.clipping import ClipResult, FoldsClip, clip_folded_, measure
from mixprec.loss_scaler import reciprocal_fp32


def mlp(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device)


def batch(step, device):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(64, 16, generator=gen).to(device), torch.randn(64, 4, generator=gen).to(device)


class FoldingSGD(torch.optim.Optimizer):
    """The smallest optimizer of the protocol, written by a user: plain SGD whose step unscales,
    clips and skips on overflow on the device, from what GradScaler and fold_clip hand it."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.result = None

    def fold_clip(self, result):
        self.result = result

    def zero_grad(self, set_to_none=True):
        self.result = None
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self):
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if grad_scale is not None:
                    g = g * (reciprocal_fp32(grad_scale) if self.result is None else self.result.inv_scale_for(grad_scale))
                if self.result is not None:
                    g = g * self.result.clip_coef[p.device]
                new = torch.add(p, g, alpha=-group["lr"])
                p.copy_(new if found_inf is None else torch.where(found_inf > 0, p, new))
        self.result = None


def test_the_protocol_is_recognised_by_its_public_method():
    params = [torch.nn.Parameter(torch.ones(3))]
    assert isinstance(optim.AdamW(params), FoldsClip) and isinstance(optim.SGD(params), FoldsClip)
    assert isinstance(FoldingSGD(params, 0.1), FoldsClip)
    assert not isinstance(torch.optim.AdamW(params), FoldsClip)
    with pytest.raises(TypeError, match="fold_clip"):
        clip_folded_(torch.optim.SGD(params, lr=0.1), 1.0)


def test_measure_reads_once_and_writes_nothing(device):
    model = mlp(device)
    opt = optim.AdamW(model.parameters())
    F.mse_loss(*[model(batch(0, device)[0]), batch(0, device)[1]]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    versions = [p.grad._version for p in model.parameters()]
    scale = torch.full((), 2.0**8, device=device)
    for s in (None, scale):
        result = measure(opt, 0.1, scale=s)
        assert [p.grad._version for p in model.parameters()] == versions
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        inv = 1.0 if s is None else 2.0**-8
        expected = torch.linalg.vector_norm(torch.cat([g.flatten() * inv for g in grads]))
        torch.testing.assert_close(result.total_norm, expected, rtol=1e-5, atol=0)
        coef = torch.clamp(0.1 / (result.total_norm + 1e-6), max=1.0)  # torch's formula
        assert torch.equal(result.clip_coef[model[0].weight.device], coef)
        assert result.found_inf[model[0].weight.device].item() == 0.0
        assert (result.scale is s) and (s is None) == (result.inv_scale is None)
    next(model.parameters()).grad[0, 0] = math.nan
    assert measure(opt, 0.1, scale=scale).found_inf[model[0].weight.device].item() == 1.0
    with pytest.raises(ValueError, match="norm_type"):
        measure(opt, 0.1, norm_type=0.0)


def test_a_custom_folding_optimizer_under_grad_scaler_matches_torch_amp(device):
    """A user's FoldsClip optimizer gets the norm and the inf check from one read of the scaled
    grads and unscales + clips in its own step: the updates are torch.amp's recipe with the clip
    coefficient of that norm, bit for bit, and the norm is torch's to fp32 rounding."""
    ours, ref = mlp(device), mlp(device)
    o_opt, r_opt = FoldingSGD(ours.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1, foreach=False)
    o_scaler = mixprec.GradScaler(device, init_scale=2.0**10)
    r_scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    for step in range(6):
        x, y = batch(step, device)
        o_opt.zero_grad()
        r_opt.zero_grad()
        o_scaler.scale(F.mse_loss(ours(x), y)).backward()
        r_scaler.scale(F.mse_loss(ref(x), y)).backward()
        if step == 3:  # an overflow: both skip the step and back off
            next(ours.parameters()).grad[0, 0] = math.inf
            next(ref.parameters()).grad[0, 0] = math.inf
        versions = [p.grad._version for p in ours.parameters()]
        norm = o_scaler.clip_grad_norm_(o_opt, 0.05)
        assert [p.grad._version for p in ours.parameters()] == versions  # grads not rewritten
        r_scaler.unscale_(r_opt)
        r_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
        # torch's clip_grad_norm_ with the coefficient of our norm: the one difference left
        coef = torch.clamp(0.05 / (norm + 1e-6), max=1.0)
        for p in ref.parameters():
            p.grad.mul_(coef)
        o_scaler.step(o_opt)
        r_scaler.step(r_opt)
        o_scaler.update()
        r_scaler.update()
        if step != 3:
            torch.testing.assert_close(norm, r_norm, rtol=1e-5, atol=0)
        for po, pr in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(po, pr)
        assert o_scaler.get_scale() == r_scaler.get_scale()
    assert o_opt.result is None  # the step consumed it


def test_a_plain_torch_optimizer_gets_unscale_and_torch_clip_bit_for_bit(device):
    ours, ref = mlp(device), mlp(device)
    o_opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, foreach=True)
    r_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=True)
    o_scaler = mixprec.GradScaler(device, init_scale=2.0**10)
    r_scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    for step in range(5):
        x, y = batch(step, device)
        for model, opt, scaler in [(ours, o_opt, o_scaler), (ref, r_opt, r_scaler)]:
            opt.zero_grad()
            scaler.scale(F.mse_loss(model(x), y)).backward()
        norm = o_scaler.clip_grad_norm_(o_opt, 0.05)
        r_scaler.unscale_(r_opt)
        r_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert torch.equal(norm, r_norm)
        for model, opt, scaler in [(ours, o_opt, o_scaler), (ref, r_opt, r_scaler)]:
            scaler.step(opt)
            scaler.update()
        for po, pr in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(po, pr)


def _grads_for(model, seed, device):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(device)


def _unclipped_step(device, seed):
    """The parameters after one unclipped AdamW step on the grads of `seed`."""
    model = mlp(device)
    opt = optim.AdamW(model.parameters(), lr=0.1)
    _grads_for(model, seed, device)
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_a_clip_result_is_used_by_one_step_and_dropped_by_zero_grad(device):
    """Today's rules: the next step applies the result and drops it; zero_grad drops it (it
    belongs to the grads it was measured on); a new clip replaces it."""
    unclipped = _unclipped_step(device, seed=1)

    def run(between):
        model = mlp(device)
        opt = optim.AdamW(model.parameters(), lr=0.1)
        _grads_for(model, 1, device)
        opt.clip_grad_norm_(1e-3)  # a tiny max_norm: a clipped step would differ
        between(model, opt)
        opt.step()
        return [p.detach() for p in model.parameters()]

    def zero_then_same_grads(model, opt):
        opt.zero_grad()
        _grads_for(model, 1, device)

    def clip_again_loosely(model, opt):
        opt.clip_grad_norm_(1e6)  # coefficient 1

    clipped = run(lambda model, opt: None)
    assert not all(torch.equal(a, b) for a, b in zip(clipped, unclipped))
    for between in (zero_then_same_grads, clip_again_loosely):
        assert all(torch.equal(a, b) for a, b in zip(run(between), unclipped)), between.__name__

    # the step dropped it: a second step (fresh optimizer state aside) is not clipped
    model, twin = mlp(device), mlp(device)
    opt, twin_opt = optim.AdamW(model.parameters(), lr=0.1), optim.AdamW(twin.parameters(), lr=0.1)
    for m, o, clip in [(model, opt, True), (twin, twin_opt, False)]:
        _grads_for(m, 1, device)
        if clip:
            o.clip_grad_norm_(1e6)
        o.step()
        _grads_for(m, 2, device)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_fold_clip_is_the_whole_hand_over(device):
    """A ClipResult built by hand and handed over through fold_clip() is what step() applies."""
    model, twin = mlp(device), mlp(device)
    opt, twin_opt = optim.SGD(model.parameters(), lr=0.1), optim.SGD(twin.parameters(), lr=0.1)
    _grads_for(model, 3, device)
    _grads_for(twin, 3, device)
    coef = torch.tensor(0.25, device=device)
    opt.fold_clip(ClipResult(coef, {model[0].weight.device: coef}, {}))
    opt.step()
    for p in twin.parameters():
        p.grad.mul_(0.25)
    twin_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_precision_clips_a_custom_folding_optimizer(device):
    for name in ("bf16-mixed", "16-mixed"):
        model = mlp(device)
        opt = FoldingSGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*on CPU is slower than bf16-mixed")
            prec = mixprec.Precision(name, device=device)
        model, opt = prec.setup(model, opt)
        x, y = batch(0, device)
        prec.backward(F.mse_loss(model(x), y))
        norm = prec.clip_grad_norm_(opt, 1e-3)
        assert isinstance(opt.result, ClipResult) and opt.result.total_norm is norm
        before = [p.detach().clone() for p in model.parameters()]
        prec.step(opt)
        assert opt.result is None
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# -- item 22: the norm is torch's, bit for bit ------------------------------------------------------

def _grad_values(shape, dtype, low, high, zeros, gen):
    """sign * [1, 2) * 2**e with e uniform in [low, high] per element (a few zeros): magnitudes
    spread widely but inside the range measure() promises exactness in."""
    n = math.prod(shape)
    e = torch.randint(low, high + 1, (n,), generator=gen).double()
    v = (1 + torch.rand(n, generator=gen, dtype=torch.float64)) * torch.exp2(e)
    v = torch.where(torch.rand(n, generator=gen) < 0.5, -v, v)
    v[torch.rand(n, generator=gen) < zeros] = 0.0
    return v.view(shape).to(dtype)


@st.composite
def clip_cases(draw):
    """Grads (fp32/bf16, several layouts), a scale (power of two or not), norm type, max_norm."""
    pow2 = draw(st.booleans())
    scale = 2.0 ** draw(st.integers(-8, 24)) if pow2 else draw(
        st.floats(0.3, 2.0**20).filter(lambda x: math.frexp(x)[0] != 0.5))
    specs = draw(st.lists(st.tuples(
        st.sampled_from([(1,), (7,), (33, 5), (64, 129), (70001,)]),
        st.sampled_from([torch.float32, torch.bfloat16]),
        st.sampled_from(["contiguous", "transposed", "strided"]),
        st.integers(-30, 0), st.integers(0, 30), st.sampled_from([0.0, 0.3])), min_size=1, max_size=5))
    return {
        "scale": scale, "specs": specs, "seed": draw(st.integers(0, 2**31 - 1)),
        "norm_type": draw(st.sampled_from([2.0, 2.0, math.inf, 1.0, 3.0])),
        "max_norm": draw(st.floats(1e-3, 1e3)),
        "bad": draw(st.sampled_from([None, None, None, math.inf, -math.inf, math.nan])),
    }


def _layout(t, layout):
    if layout == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "strided":
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    return t


@settings(max_examples=40)
@given(case=clip_cases())
def test_scaler_clip_norm_is_torch_unscale_and_clip_bit_for_bit(device, case):
    """GradScaler.clip_grad_norm_ with a mixprec optimizer returns torch.amp's unscale_ +
    torch.nn.utils.clip_grad_norm_ norm bit for bit (dtype included) and the same inf check; the
    step that follows equals our optimizer stepped on torch's unscaled, clipped grads: bit for bit
    for fp32 (the kernel unscales and clips in fp32, as torch does on fp32 grads), and for bf16 to
    bf16's tolerance (torch rounds the clipped grad to bf16, the kernel keeps it in fp32). torch.amp
    unscales bf16 grads on the CPU only, so on CUDA the bf16 cases have no oracle: fp32 there."""
    gen = torch.Generator().manual_seed(case["seed"])
    ours, ref = [], []
    for i, (shape, dtype, layout, low, high, zeros) in enumerate(case["specs"]):
        if device == "cuda":
            dtype = torch.float32
        p = torch.randn(shape, generator=gen).to(device, dtype)
        g = _grad_values(shape, dtype, low, high, zeros, gen).to(device)
        if i == 0 and case["bad"] is not None:
            g.view(-1)[0] = case["bad"]
        for params in (ours, ref):
            params.append(torch.nn.Parameter(p.clone()))
            params[-1].grad = _layout(g.clone(), layout)
    o_opt, r_opt = optim.AdamW(ours, lr=1e-2), optim.AdamW(ref, lr=1e-2)
    o_scaler = mixprec.GradScaler(device, init_scale=case["scale"])
    r_scaler = torch.amp.GradScaler(device, init_scale=case["scale"])
    for scaler in (o_scaler, r_scaler):
        scaler.scale(torch.ones((), device=device))  # creates the scale tensor

    versions = [p.grad._version for p in ours]
    norm = o_scaler.clip_grad_norm_(o_opt, case["max_norm"], case["norm_type"])
    # A power-of-two scale and norm type 1, 2 or inf: one read of the scaled grads; otherwise
    # they were unscaled in place first, as torch's recipe does.
    read_scaled = math.frexp(case["scale"])[0] == 0.5 and case["norm_type"] != 3.0
    assert ([p.grad._version for p in ours] == versions) == read_scaled
    r_scaler.unscale_(r_opt)
    r_norm = torch.nn.utils.clip_grad_norm_(ref, case["max_norm"], case["norm_type"])
    assert_bitwise_equal(norm, r_norm, "total norm")
    found = sum(v.item() for v in o_scaler.found_inf_per_device(o_opt).values())
    r_found = sum(v.item() for v in r_scaler._found_inf_per_device(r_opt).values())
    assert (found != 0) == (r_found != 0)

    o_scaler.step(o_opt)
    r_scaler.step(r_opt)
    for i, (po, pr) in enumerate(zip(ours, ref)):
        if po.dtype == torch.float32:
            assert_bitwise_equal(po.detach(), pr.detach(), f"param {i}")
        else:
            torch.testing.assert_close(po, pr)
        if found:
            assert torch.equal(po, pr)  # both skipped: untouched


def _clip_twins(device, o_scaler, r_scaler, seed):
    """One clip by each recipe on the same fp32 grads; returns (ours, torch's, grads rewritten)."""
    gen = torch.Generator().manual_seed(seed)
    ours, ref = mlp(device), mlp(device)
    for po, pr in zip(ours.parameters(), ref.parameters()):
        g = torch.randn(po.shape, generator=gen).to(device) * 100
        po.grad, pr.grad = g.clone(), g.clone()
    o_opt, r_opt = optim.SGD(ours.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    versions = [p.grad._version for p in ours.parameters()]
    norm = o_scaler.clip_grad_norm_(o_opt, 1.0)
    rewritten = [p.grad._version for p in ours.parameters()] != versions
    r_scaler.unscale_(r_opt)
    r_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    for scaler, opt in ((o_scaler, o_opt), (r_scaler, r_opt)):
        scaler.step(opt)
        scaler.update()
    return norm, r_norm, rewritten


def test_the_scaler_knows_without_a_sync_when_its_scale_stops_being_a_power_of_two(device):
    """Growth by 3, a float new_scale or a loaded scale that is not a power of two send
    clip_grad_norm_ through an in-place unscale_ (torch's norm needs it); a power of two again
    brings back the single read. Either way the norm is torch's bit for bit."""
    o_scaler = mixprec.GradScaler(device, init_scale=2.0**10, growth_factor=3.0, growth_interval=1)
    r_scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_factor=3.0, growth_interval=1)
    for scaler in (o_scaler, r_scaler):
        scaler.scale(torch.ones((), device=device))
    rewritten = []
    for seed in range(3):  # 2**10, then 3 * 2**10, 9 * 2**10
        norm, r_norm, was_rewritten = _clip_twins(device, o_scaler, r_scaler, seed)
        assert_bitwise_equal(norm, r_norm, f"step {seed}")
        rewritten.append(was_rewritten)
    assert rewritten == [False, True, True]
    # (change, whether the next clip reads the scaled grads); a tensor new_scale is not read on
    # the host: not known to be a power of two, so the in-place route.
    for change, expect_read in ((lambda s: s.update(2.0**12), True), (lambda s: s.update(1000.0), False),
                                (lambda s: s.load_state_dict({**s.state_dict(), "scale": 2.0**5}), True),
                                (lambda s: s.load_state_dict({**s.state_dict(), "scale": 96.0}), False),
                                (lambda s: s.update(torch.full((), 2.0**8, device=device)), False)):
        for scaler in (o_scaler, r_scaler):
            change(scaler)
            scaler.set_growth_factor(2.0)
        norm, r_norm, was_rewritten = _clip_twins(device, o_scaler, r_scaler, 7)
        assert_bitwise_equal(norm, r_norm)
        assert was_rewritten == (not expect_read)


def test_fp16_grads_are_measured_scaled_where_torch_amp_refuses_to_unscale_them(device):
    """torch.amp.GradScaler.unscale_ raises on fp16 grads, so there is no torch norm to equal:
    ours is the norm of grads / scale accumulated in fp32, grads untouched."""
    model = mlp(device).half()
    opt = optim.AdamW(model.parameters())
    scaler = mixprec.GradScaler(device, init_scale=2.0**12)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 2.0**8).to(device, torch.float16)
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.scale(torch.ones((), device=device))
    norm = scaler.clip_grad_norm_(opt, 1.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    expected = torch.nn.utils.get_total_norm([g.float() * 2.0**-12 for g in grads])
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    r_scaler = torch.amp.GradScaler(device)
    r_scaler.scale(torch.ones((), device=device))
    with pytest.raises(ValueError, match="FP16"):
        r_scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 3.0])
def test_optimizer_clip_norm_is_torch_clip_grad_norm_bit_for_bit(device, norm_type):
    """opt.clip_grad_norm_ (no scaler) returns torch.nn.utils.clip_grad_norm_'s norm, dtype
    included (bf16 when every grad is), for fp32, bf16, fp16 and mixed grads."""
    gen = torch.Generator().manual_seed(3)
    for dtypes in ([torch.float32] * 3, [torch.bfloat16] * 2, [torch.float16], [torch.float32, torch.bfloat16]):
        params = [torch.nn.Parameter(torch.zeros(n, dtype=d, device=device)) for n, d in zip((70001, 33, 5), dtypes)]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 10).to(device, p.dtype)
        grads = [p.grad.clone() for p in params]
        norm = optim.AdamW(params).clip_grad_norm_(0.5, norm_type)
        for p, g in zip(params, grads):
            p.grad = g
        assert_bitwise_equal(norm, torch.nn.utils.clip_grad_norm_(params, 0.5, norm_type), str(dtypes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_norm_is_one_read_within_an_ulp_and_clips_in_the_step(device, dtype):
    """clip_grad_norm_(exact=False): our one-read kernel's norm (fp32, whatever the grads' dtype)
    within a few fp32 ulps of the exact norm (relative 1e-6: fp32 accumulation in its own order),
    no grad rewritten before the step, and the step clips with its coefficient (torch's formula
    on that norm)."""
    torch.manual_seed(3)
    shapes = [(257,), (33, 17), (4096,)]
    grads = [torch.randn(s, device=device).to(dtype) * 0.5 for s in shapes]
    params = [torch.nn.Parameter(torch.ones(s, device=device, dtype=dtype)) for s in shapes]
    scaler = mixprec.GradScaler(device, init_scale=2.0**8)
    scaler.scale(torch.zeros((), device=device))
    opt = optim.SGD(params, lr=1.0)
    for p, g in zip(params, grads):
        p.grad = g * 256.0
    scaled = [p.grad.clone() for p in params]
    norm = scaler.clip_grad_norm_(opt, 0.5, exact=False)
    assert norm.dtype == torch.float32
    assert all(torch.equal(p.grad, s) for p, s in zip(params, scaled))  # nothing rewritten yet
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
    assert abs(norm.double().item() - expected.item()) <= 1e-6 * expected.item()
    coef = torch.clamp(0.5 / (norm + 1e-6), max=1.0)
    scaler.step(opt)
    for p, g in zip(params, grads):
        update = (g.float() * coef).to(dtype) if dtype != torch.float32 else g * coef
        rtol = 2e-2 if dtype != torch.float32 else 1e-6  # the bf16 weight is rounded
        torch.testing.assert_close(p.detach().float(), 1.0 - update.float(), rtol=rtol, atol=1e-6)
