"""Accelerate with mixprec's GradScaler and optimizers (issue 14 item 23): Accelerate detects a
skipped step by whether optimizer.step() was called; with GradScaler(skip_on_host=True) an
overflowing step is not called, so optimizer_step_was_skipped holds and the LR scheduler waits."""
import math

import pytest
import torch
import torch.nn.functional as F

import mixprec
from mixprec import optim

accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
from accelerate.state import AcceleratorState, GradientState


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerate keeps process-wide state: each test starts from none.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _run(device, skip_on_host, overflow_steps, steps=6):
    """A real Accelerator loop (fp16; on the CPU Accelerate makes no scaler, so ours is given to
    it as on CUDA); returns per step (skipped flag, lr before, lr after, params before/after)."""
    acc = accelerate.Accelerator(cpu=device == "cpu", mixed_precision="fp16")
    acc.scaler = mixprec.GradScaler(device, init_scale=2.0**10, skip_on_host=skip_on_host)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model, opt, sched = acc.prepare(model, opt, sched)
    gen = torch.Generator().manual_seed(1)
    log = []
    for step in range(steps):
        x, y = torch.randn(4, 8, generator=gen).to(acc.device), torch.randn(4, 1, generator=gen).to(acc.device)
        before = [p.detach().clone() for p in model.parameters()]
        lr = sched.get_last_lr()[0]
        acc.backward(F.mse_loss(model(x), y))
        if step in overflow_steps:
            next(model.parameters()).grad[0, 0] = math.inf
        opt.step()
        sched.step()
        opt.zero_grad()
        after = [p.detach().clone() for p in model.parameters()]
        log.append((acc.optimizer_step_was_skipped, lr, sched.get_last_lr()[0], before, after))
    return log, acc.scaler


def test_accelerate_sees_the_skip_and_holds_the_scheduler_back(device):
    log, scaler = _run(device, skip_on_host=True, overflow_steps={0, 3})
    for step, (skipped, lr_before, lr_after, before, after) in enumerate(log):
        if step in (0, 3):
            assert skipped
            assert lr_after == lr_before  # the scheduler did not advance
            assert all(torch.equal(a, b) for a, b in zip(after, before))  # weights untouched
        else:
            assert not skipped
            assert lr_after == lr_before * 0.5
            assert not all(torch.equal(a, b) for a, b in zip(after, before))
    assert scaler.get_scale() == 2.0**10 * 0.25  # two back-offs
    assert scaler.stats()["skipped_steps"] == 2


def test_skip_on_host_changes_nothing_but_the_call(device):
    """Without the option the step is still skipped on the device (weights untouched) but step()
    was called, so Accelerate reads no skip; with it the weights and scale are the same."""
    default, d_scaler = _run(device, skip_on_host=False, overflow_steps={2})
    on_host, h_scaler = _run(device, skip_on_host=True, overflow_steps={2})
    assert [s for s, *_ in default] == [False] * 6
    assert [s for s, *_ in on_host] == [False, False, True, False, False, False]
    assert all(torch.equal(a, b) for a, b in zip(default[2][4], default[2][3]))
    # Same updates on every step the two runs took (the scheduler aside: default advanced it).
    for step in (0, 1, 2):
        assert all(torch.equal(a, b) for a, b in zip(default[step][4], on_host[step][4]))
    assert d_scaler.get_scale() == h_scaler.get_scale()


def test_a_skipped_step_drops_the_folded_clip(device):
    """clip_grad_norm_ hands the clip to the optimizer's next step; a step skipped on the host
    drops it as the step would, so the next step is not clipped by a stale coefficient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).to(device)
    opt = optim.AdamW(model.parameters(), lr=0.1)
    scaler = mixprec.GradScaler(device, init_scale=4.0, skip_on_host=True)
    scaler.scale(model(torch.ones(1, 4, device=device)).sum()).backward()
    model.weight.grad[0, 0] = math.inf
    scaler.clip_grad_norm_(opt, 1e-3)
    assert scaler.step(opt) is None
    scaler.update()
    assert len(opt.state) == 0  # step() was not called: no state created
    twin = torch.nn.Linear(4, 2).to(device)
    twin.load_state_dict(model.state_dict())
    t_opt = optim.AdamW(twin.parameters(), lr=0.1)
    for m in (model, twin):
        m.zero_grad()
        m.weight.grad = torch.ones_like(m.weight)
        m.bias.grad = torch.ones_like(m.bias)
    opt.step()  # no clip left over
    t_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
