"""DynamicLossScaler: the state machine on its own, and the options torch does not have."""
import pickle
import warnings

import pytest
import torch

import mixprec
from mixprec import DynamicLossScaler, MinScaleOverflowError
from mixprec.loss_scaler import SCALE_FLOOR


def overflow(device):
    return torch.ones((), device=device)


def clean(device):
    return torch.zeros((), device=device)


def test_defaults_follow_torch_rule(device):
    s = DynamicLossScaler(device, init_scale=8.0, growth_interval=2)
    for f in [clean, clean, overflow, clean]:
        s.update(f(device))
    assert s.stats() == {"scale": 8.0, "growth_tracker": 1, "hysteresis_tracker": 1,
                         "skipped_steps": 1, "overflows_at_min_scale": 0,
                         "scale_at_floor": False, "nonfinite_since_step": None}


def test_unscale_groups_mixed_dtypes_and_returns_found_inf_per_device(device):
    s = DynamicLossScaler(device, init_scale=4.0)
    grads = [torch.full((3,), 8.0, device=device), torch.full((2,), 8.0, device=device).bfloat16(),
             torch.full((2,), 8.0, device=device).half()]
    found = s.unscale_(grads)
    assert list(found) == [torch.device(device) if device == "cpu" else grads[0].device]
    assert all(g.float().tolist() == [2.0] * g.numel() for g in grads)
    assert found[grads[0].device].item() == 0.0
    grads[1][0] = float("nan")
    assert s.unscale_(grads)[grads[0].device].item() == 1.0


def test_max_scale_caps_growth(device):
    s = DynamicLossScaler(device, init_scale=2.0**10, growth_interval=1, max_scale=3000.0)
    for _ in range(3):
        s.update(clean(device))
    assert s.get_scale() == 3000.0


def test_min_scale_raises_clear_error_after_overflow_at_min(device):
    s = DynamicLossScaler(device, init_scale=4.0, min_scale=1.0)
    with pytest.raises(MinScaleOverflowError, match="already at min_scale=1.0"):
        for _ in range(20):  # on CUDA the error surfaces a step or two late, without a sync
            s.update(overflow(device))
            if device == "cuda":
                torch.cuda.synchronize()
    assert s.get_scale() == 1.0  # never below min_scale


def test_min_scale_does_not_raise_while_backing_off(device):
    s = DynamicLossScaler(device, init_scale=8.0, min_scale=1.0)
    for _ in range(3):  # 8 -> 4 -> 2 -> 1: reaching min_scale is fine, overflowing there is not
        s.update(overflow(device))
    s.update(clean(device))
    assert s.get_scale() == 1.0 and s.stats()["skipped_steps"] == 3


def test_pickle_and_state_dict_round_trip(device):
    s = DynamicLossScaler(device, init_scale=16.0, hysteresis=3, growth_interval=5)
    s.update(overflow(device))
    s.update(clean(device))
    restored = pickle.loads(pickle.dumps(s))
    restored.materialize(torch.device(device))
    assert restored.stats() == s.stats()
    other = DynamicLossScaler(device)
    other.load_state_dict(s.state_dict())
    assert other.state_dict() == s.state_dict()


@pytest.mark.parametrize("kwargs, message", [
    ({"growth_factor": 1.0}, "growth_factor must be > 1.0"),
    ({"backoff_factor": 1.5}, "backoff_factor must be in"),
    ({"growth_interval": 0}, "growth_interval must be an integer >= 1"),
    ({"hysteresis": 0}, "hysteresis must be an integer >= 1"),
    ({"min_scale": -1.0}, "min_scale must be >= 0"),
    ({"min_scale": 4.0, "max_scale": 2.0}, "max_scale must be >= min_scale"),
    ({"init_scale": float("inf")}, "init_scale must be a positive finite"),
])
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicLossScaler("cpu", **kwargs)


def test_missing_state_dict_keys_name_them():
    with pytest.raises(KeyError, match="missing \\['growth_interval'"):
        DynamicLossScaler("cpu").load_state_dict({"scale": 1.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                  "_growth_tracker": 0})


def test_grad_scaler_hysteresis_skips_but_keeps_scale(device):
    scaler = mixprec.GradScaler(device, init_scale=64.0, hysteresis=2)
    p = torch.nn.Parameter(torch.ones(3, device=device))
    opt = torch.optim.SGD([p], lr=0.1)
    scales = []
    for step in range(3):
        scaler.scale(p.sum()).backward()
        p.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    assert scales == [64.0, 32.0, 16.0]  # the first overflow is tolerated, then it backs off
    assert torch.equal(p.detach().cpu(), torch.ones(3)) and scaler.stats()["skipped_steps"] == 3


def test_scale_backs_off_to_the_floor_not_to_zero(device):
    """torch.amp's rule halves to subnormals and 0.0; ours stops at SCALE_FLOOR, counts the
    overflows there, and reports since when every step was non-finite (warning once)."""
    s = DynamicLossScaler(device, init_scale=2.0**-20)
    s.update(clean(device))  # step 1 is finite
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            s.update(overflow(device))
        stats = s.stats()
    floor_warnings = [str(w.message) for w in caught if "floor" in str(w.message)]
    assert len(floor_warnings) == 1
    assert "floor 5.96046e-08: every step non-finite since step 2 " in floor_warnings[0]
    assert stats["scale"] == SCALE_FLOOR == 2.0**-24 and stats["scale_at_floor"] is True
    assert stats["nonfinite_since_step"] == 2 and stats["overflows_at_min_scale"] == 6
    s.update(clean(device))
    assert s.stats()["nonfinite_since_step"] is None and s.get_scale() == SCALE_FLOOR


def test_min_scale_below_the_floor_is_raised_to_it(device):
    s = DynamicLossScaler(device, init_scale=2.0**-23, min_scale=0.0)
    with pytest.raises(MinScaleOverflowError):
        for _ in range(20):
            s.update(overflow(device))
            if device == "cuda":
                torch.cuda.synchronize()
    assert s.get_scale() == SCALE_FLOOR


def test_floor_bookkeeping_survives_pickle_and_resets_on_load(device):
    s = DynamicLossScaler(device, init_scale=2.0**-23)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            s.update(overflow(device))
        s.stats()  # on CUDA the check waits for a host-visible point
    assert ["since step 1 " in str(w.message) for w in caught] == [True]
    restored = pickle.loads(pickle.dumps(s))
    restored.materialize(torch.device(device))
    assert restored.stats() == s.stats()
    s.load_state_dict(s.state_dict())
    assert s.stats()["nonfinite_since_step"] is None


def test_step_numbers_count_on_across_a_load(device):
    s = DynamicLossScaler(device, init_scale=2.0**-20)
    for f in [clean, clean, overflow, overflow]:  # 2**-22: not yet at the floor
        s.update(f(device))
    s.load_state_dict(s.state_dict())  # the run starts afresh, the step numbers go on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            s.update(overflow(device))
        stats = s.stats()
    assert stats["nonfinite_since_step"] == 5 and stats["scale_at_floor"] is True
    assert ["since step 5 " in str(w.message) for w in caught] == [True]
