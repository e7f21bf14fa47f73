"""mixprec.clipping: the public hand-over of clipping between GradScaler, the optimizers and
Precision. torch.amp's recipe (unscale_ + torch.nn.utils.clip_grad_norm_ + step) is the oracle."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

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
