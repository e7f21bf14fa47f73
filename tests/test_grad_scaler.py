"""mixprec.GradScaler against torch.amp.GradScaler: same parameters bit for bit, same scales,
same state_dict, same exceptions. torch is the oracle."""
import copy
import inspect
import pickle
import warnings

import pytest
import torch
from helpers import assert_bitwise_equal
from hypothesis import given
from hypothesis import strategies as st

import mixprec

TorchGradScaler = torch.amp.GradScaler
SCALERS = {"torch": TorchGradScaler, "mixprec": mixprec.GradScaler}

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True, weight_decay=0.1),
    # fused optimizers declare _step_supports_amp_scaling: they get grad_scale/found_inf
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw_fused_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True, amsgrad=True),
}


def make_model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(device)


def autocast(device):
    return torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16)


class Run:
    """One model + optimizer + scaler, stepping through a schedule."""

    def __init__(self, scaler, device, opt_name, seed=0):
        self.model = make_model(device, seed)
        self.opt = OPTIMIZERS[opt_name](self.model.parameters())
        self.scaler = scaler

    def step(self, batches, inject_inf, clip):
        for x, y in batches:  # gradient accumulation over micro-batches
            with autocast(x.device.type):
                loss = torch.nn.functional.mse_loss(self.model(x).float(), y)
            self.scaler.scale(loss).backward()
        if inject_inf is not None:
            param_index, value = inject_inf
            list(self.model.parameters())[param_index].grad.view(-1)[0] = value
        if clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.5)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)


@given(opt_name=st.sampled_from(sorted(OPTIMIZERS)),
       steps=st.lists(st.tuples(
           st.integers(1, 3),                                                  # micro-batches
           st.one_of(st.none(), st.tuples(st.integers(0, 3),
                                          st.sampled_from([float("inf"), float("-inf"), float("nan")]))),
           st.booleans()),                                                     # clip
           min_size=1, max_size=12),
       init_scale=st.sampled_from([2.0**16, 2.0**3, 1.0, 2.0**-3, 3.0e4]),
       growth_interval=st.integers(1, 4),
       handover=st.one_of(st.none(), st.integers(0, 11)),
       seed=st.integers(0, 1000))
def test_training_schedule_matches_torch(device, opt_name, steps, init_scale, growth_interval,
                                          handover, seed):
    kwargs = {"init_scale": init_scale, "growth_interval": growth_interval}
    ours = Run(mixprec.GradScaler(device, **kwargs), device, opt_name)
    ref = Run(TorchGradScaler(device, **kwargs), device, opt_name)
    gen = torch.Generator().manual_seed(seed)
    for i, (micro, inject, clip) in enumerate(steps):
        if i == handover:  # checkpoint hand-over between the two classes, both ways
            ours_state, ref_state = ref.scaler.state_dict(), ours.scaler.state_dict()
            ours.scaler, ref.scaler = mixprec.GradScaler(device), TorchGradScaler(device)
            ours.scaler.load_state_dict(ours_state)
            ref.scaler.load_state_dict(ref_state)
        batches = [(torch.randn(4, 8, generator=gen).to(device), torch.randn(4, 4, generator=gen).to(device))
                   for _ in range(micro)]
        ours.step(batches, inject, clip)
        ref.step(batches, inject, clip)
        assert ours.scaler.get_scale() == ref.scaler.get_scale(), f"step {i}"
        assert ours.scaler.state_dict() == ref.scaler.state_dict(), f"step {i}"
        for j, (p, q) in enumerate(zip(ours.model.parameters(), ref.model.parameters())):
            assert_bitwise_equal(p, q, f"step {i} param {j}")
        for (p, q) in zip(ours.opt.state.values(), ref.opt.state.values()):
            for key in p:
                assert_bitwise_equal(torch.as_tensor(p[key]), torch.as_tensor(q[key]), f"step {i} state {key}")


def test_multiple_optimizers_and_losses(device):
    results = {}
    for name, cls in SCALERS.items():
        torch.manual_seed(0)
        a, b = make_model(device, 1), make_model(device, 2)
        opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.Adam(b.parameters(), lr=0.01)
        scaler = cls(device, init_scale=2.0**10, growth_interval=2)
        gen = torch.Generator().manual_seed(0)
        for step in range(6):
            x = torch.randn(4, 8, generator=gen).to(device)
            with autocast(device):
                out_a, out_b = a(x), b(x)
                loss0 = (out_a.float() * out_b.float()).mean()
                loss1 = out_b.float().pow(2).mean()
            scaler.scale(loss0).backward(retain_graph=True)
            scaler.scale(loss1).backward()
            if step == 3:
                next(b.parameters()).grad[0, 0] = float("inf")  # only opt_b overflows
            scaler.unscale_(opt_a)
            scaler.step(opt_a)
            scaler.step(opt_b)
            scaler.update()
            opt_a.zero_grad()
            opt_b.zero_grad()
        results[name] = ([p.detach().clone() for p in [*a.parameters(), *b.parameters()]], scaler.get_scale())
    assert results["torch"][1] == results["mixprec"][1]
    for p, q in zip(results["torch"][0], results["mixprec"][0]):
        assert_bitwise_equal(q, p)


def test_scale_accepts_nested_lists_tuples_and_iterables(device):
    outputs = [torch.ones(2, device=device), (torch.full((3,), 2.0, device=device), [torch.ones(1, device=device)])]
    for cls in SCALERS.values():
        scaled = cls(device, init_scale=4.0).scale(outputs)
        assert isinstance(scaled, list) and isinstance(scaled[1], tuple) and isinstance(scaled[1][1], list)
        assert scaled[1][0].tolist() == [8.0] * 3 and scaled[1][1][0].item() == 4.0
        gen = cls(device, init_scale=4.0).scale(t for t in [torch.ones(1, device=device)])
        assert [t.item() for t in gen] == [4.0]
    with pytest.raises(ValueError, match="outputs must be a Tensor or an iterable of Tensors"):
        mixprec.GradScaler(device).scale([1.0])


def test_disabled_is_a_pass_through(device):
    model = make_model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = mixprec.GradScaler(device, enabled=False)
    loss = model(torch.ones(2, 8, device=device)).sum()
    assert scaler.scale(loss) is loss
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.unscale_(opt)
    assert scaler.step(opt) is None
    scaler.update()
    assert not scaler.is_enabled() and scaler.get_scale() == 1.0 and scaler.state_dict() == {}
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_cuda_scaler_without_cuda_warns_and_disables():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the behaviour under test needs its absence
    with pytest.warns(UserWarning, match="CUDA is not available.  Disabling."):
        assert not mixprec.GradScaler("cuda").is_enabled()


def _misuse_cases(device):
    def setup(cls, **kw):
        model = make_model(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = cls(device, **kw)
        scaler.scale(model(torch.ones(2, 8, device=device)).sum()).backward()
        return model, opt, scaler

    def unscale_twice(cls):
        _, opt, s = setup(cls)
        s.unscale_(opt)
        s.unscale_(opt)

    def unscale_after_step(cls):
        _, opt, s = setup(cls)
        s.step(opt)
        s.unscale_(opt)

    def step_twice(cls):
        _, opt, s = setup(cls)
        s.step(opt)
        s.step(opt)

    def closure(cls):
        _, opt, s = setup(cls)
        s.step(opt, closure=lambda: None)

    def fp16_grads(cls):
        model, opt, s = setup(cls)
        for p in model.parameters():
            p.grad = p.grad.half()
        s.unscale_(opt)

    def step_without_scale(cls):
        model = make_model(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cls(device).step(opt)

    def update_without_step(cls):
        _, _, s = setup(cls)
        s.update()

    def step_without_grads(cls):
        model = make_model(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s = cls(device)
        s.scale(torch.ones((), device=device))
        s.step(opt)

    def empty_state_dict(cls):
        cls(device).load_state_dict({})

    def growth_factor_le_1(cls):
        cls(device, growth_factor=1.0)

    def backoff_factor_ge_1(cls):
        cls(device, backoff_factor=1.0)

    def pickle_mid_iteration(cls):
        _, opt, s = setup(cls)
        s.unscale_(opt)
        pickle.dumps(s)

    def update_with_bad_tensor(cls):
        _, opt, s = setup(cls)
        s.step(opt)
        s.update(torch.ones(2, device=device))

    return {f.__name__: f for f in [unscale_twice, unscale_after_step, step_twice, closure,
                                    fp16_grads, step_without_scale, update_without_step,
                                    step_without_grads, empty_state_dict, growth_factor_le_1,
                                    backoff_factor_ge_1, pickle_mid_iteration, update_with_bad_tensor]}


@pytest.mark.parametrize("case", sorted(_misuse_cases("cpu")))
def test_misuse_raises_what_torch_raises(device, case):
    fn = _misuse_cases(device)[case]
    errors = {}
    for name, cls in SCALERS.items():
        with pytest.raises(Exception) as info:
            fn(cls)
        errors[name] = (type(info.value), str(info.value))
    assert errors["mixprec"] == errors["torch"]


def test_state_dict_loads_both_ways_and_pickles(device):
    s = mixprec.GradScaler(device, init_scale=2.0**5, growth_interval=3)
    model = make_model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        s.scale(model(torch.ones(2, 8, device=device)).sum()).backward()
        s.step(opt)
        s.update()
    t = TorchGradScaler(device)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict() == {
        "scale": 32.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3, "_growth_tracker": 2}
    back = mixprec.GradScaler(device)
    back.load_state_dict(t.state_dict())
    assert back.state_dict() == t.state_dict()
    restored = pickle.loads(pickle.dumps(s))
    assert restored.state_dict() == s.state_dict()
    assert copy.deepcopy(s).state_dict() == s.state_dict()


def test_extra_options_round_trip_and_are_ignored_by_torch(device):
    s = mixprec.GradScaler(device, hysteresis=2, min_scale=1.0, max_scale=2.0**20)
    s.scale(torch.ones((), device=device))
    state = s.state_dict()
    assert state["hysteresis"] == 2 and state["_hysteresis_tracker"] == 2 and state["min_scale"] == 1.0
    t = TorchGradScaler(device)
    t.load_state_dict(state)  # torch ignores keys it does not know
    assert t.state_dict() == {k: state[k] for k in t.state_dict()}
    other = mixprec.GradScaler(device)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_getters_and_setters(device):
    for cls in SCALERS.values():
        s = cls(device)
        s.set_growth_factor(3.0)
        s.set_backoff_factor(0.25)
        s.set_growth_interval(7)
        assert (s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval()) == (3.0, 0.25, 7)
        assert s.get_scale() == 2.0**16 and s._get_growth_tracker() == 0 and s.is_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a GPU notion")
def test_fused_optimizer_loop_never_synchronises():
    model = make_model("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = mixprec.GradScaler("cuda", growth_interval=2)
    x = torch.randn(4, 8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(5):
            with autocast("cuda"):
                loss = model(x).float().sum()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert scaler.get_scale() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to place params on two devices")
def test_params_on_cpu_and_cuda_are_grouped_per_device():
    """An overflow in a CPU grad while the scale lives on CUDA skips the whole step.

    The oracle is plain SGD on unscaled losses over the steps that must survive (the scale is a
    power of two, so scaling and unscaling are exact). torch.amp itself is not the oracle here:
    it copies found_inf and inv_scale to the CPU with non_blocking=True and runs its CPU kernel
    before the copies land, so it can miss this overflow (measured: it kept scale 8.0)."""
    def models():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).cuda()

    def loss_of(a, b):
        return a(torch.ones(2, 4)).sum().cuda() + b(torch.ones(2, 4, device="cuda")).sum()

    a, b = models()
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1)
    scaler = mixprec.GradScaler("cuda", init_scale=8.0)
    for step in range(3):
        scaler.scale(loss_of(a, b)).backward()
        if step == 1:
            a.weight.grad[0, 0] = float("inf")  # the overflow is on the CPU
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    ref_a, ref_b = models()
    ref_opt = torch.optim.SGD([*ref_a.parameters(), *ref_b.parameters()], lr=0.1)
    for step in (0, 2):
        loss_of(ref_a, ref_b).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert scaler.get_scale() == 4.0 and scaler.stats()["skipped_steps"] == 1
    for p, q in zip(opt.param_groups[0]["params"], ref_opt.param_groups[0]["params"]):
        assert_bitwise_equal(p, q)


def test_found_inf_per_device_is_public_and_changes_nothing(device):
    """Precision reads the iteration's inf check through this accessor: the flags torch's private
    _found_inf_per_device holds, as device tensors; asking creates no iteration state."""
    s = mixprec.GradScaler(device, init_scale=2.0**5)
    model = make_model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert s.found_inf_per_device(opt) == {}
    pickle.dumps(s)  # still at the start of an iteration
    s.scale(model(torch.ones(2, 8, device=device)).sum()).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    s.unscale_(opt)
    found = s.found_inf_per_device(opt)
    assert list(found) == [next(model.parameters()).device] and found == s._found_inf_per_device(opt)
    assert next(iter(found.values())).item() == 1.0
    s.step(opt)
    s.update()
    assert s.found_inf_per_device(opt) == {}
    assert mixprec.GradScaler(device, enabled=False).found_inf_per_device(opt) == {}


def _steps(device, scaler, opt, model, nan_steps, finite_steps):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).to(device)
    for step in range(nan_steps + finite_steps):
        loss = model(x).square().mean() * (float("nan") if step < nan_steps else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)


def test_scale_underflow_never_corrupts_weights(device):
    """200 NaN losses drive torch.amp's scale to 0.0 (step 165), and the next finite batch then
    writes NaN into every weight. Ours stops at SCALE_FLOOR (2**-24, reached at step 40), keeps
    skipping, warns once naming the first non-finite step, and the finite batch is an ordinary
    step: the weights equal a fresh scaler + optimizer's first step from the same weights."""
    model = make_model(device)
    start = [p.detach().clone() for p in model.parameters()]
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = mixprec.GradScaler(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(device, scaler, opt, model, 200, 0)
        during = scaler.stats()
        _steps(device, scaler, opt, model, 0, 1)
        after = scaler.stats()
    floor_warnings = [w for w in caught if "floor" in str(w.message)]
    assert len(floor_warnings) == 1
    assert "every step non-finite since step 1 " in str(floor_warnings[0].message)
    assert during["skipped_steps"] == 200 and during["scale"] == mixprec.loss_scaler.SCALE_FLOOR
    assert during["scale_at_floor"] is True and during["nonfinite_since_step"] == 1
    assert during["overflows_at_min_scale"] == 200 - 40  # 2**16 -> 2**-24 takes 40 back-offs
    # the finite step ends the run; the scale stays at the floor until it grows again
    assert after["scale_at_floor"] is True and after["nonfinite_since_step"] is None

    fresh_model = make_model(device)
    fresh_opt = mixprec.optim.AdamW(fresh_model.parameters(), lr=1e-2)
    _steps(device, mixprec.GradScaler(device), fresh_opt, fresh_model, 0, 1)
    for p, q, s in zip(model.parameters(), fresh_model.parameters(), start):
        assert torch.isfinite(p).all() and not torch.equal(p, s)
        assert_bitwise_equal(p, q)


def test_scale_floor_changes_nothing_above_it(device):
    """Until the floor, the scale follows torch.amp's rule exactly; torch's goes on to 0.0."""
    ours, theirs = mixprec.GradScaler(device, init_scale=2.0**-20), TorchGradScaler(device, init_scale=2.0**-20)
    for s in (ours, theirs):
        s.scale(torch.ones((), device=device))
    scales = {id(ours): [], id(theirs): []}
    for _ in range(6):
        for s in (ours, theirs):
            p = torch.nn.Parameter(torch.ones(2, device=device))
            opt = torch.optim.SGD([p], lr=0.1)
            s.scale(p.sum()).backward()
            p.grad[0] = float("inf")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s.step(opt)
                s.update()
            scales[id(s)].append(s.get_scale())
    assert scales[id(ours)] == [2.0**-21, 2.0**-22, 2.0**-23, 2.0**-24, 2.0**-24, 2.0**-24]
    assert scales[id(theirs)][:4] == scales[id(ours)][:4] and scales[id(theirs)][-1] == 2.0**-26


GOOD_STATE = {"scale": 32.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
              "_growth_tracker": 1}


@pytest.mark.parametrize("change, error, message", [
    ({"growth_interval": 0}, ValueError, r"state_dict\['growth_interval'\] must be an integer >= 1, got 0"),
    ({"growth_interval": -5}, ValueError, "growth_interval"),
    ({"growth_interval": 2.5}, ValueError, "growth_interval"),
    ({"growth_interval": "3"}, TypeError, r"growth_interval'\] must be a real number, got str"),
    ({"hysteresis": 0}, ValueError, r"state_dict\['hysteresis'\] must be an integer >= 1, got 0"),
    ({"scale": 0.0}, ValueError, r"state_dict\['scale'\] must be a positive finite number"),
    ({"scale": -1.0}, ValueError, "scale"),
    ({"scale": float("inf")}, ValueError, "scale"),
    ({"scale": float("nan")}, ValueError, "scale"),
    ({"scale": None}, TypeError, "scale"),
    ({"growth_factor": 1.0}, ValueError, r"state_dict\['growth_factor'\] must be > 1.0"),
    ({"backoff_factor": 1.0}, ValueError, r"state_dict\['backoff_factor'\] must be in \(0, 1\)"),
    ({"backoff_factor": 0.0}, ValueError, "backoff_factor"),
    ({"_growth_tracker": -1}, ValueError, r"state_dict\['_growth_tracker'\] must be an integer"),
    ({"_growth_tracker": 1.5}, ValueError, "_growth_tracker"),
    ({"hysteresis": 2, "_hysteresis_tracker": 3}, ValueError, "_hysteresis_tracker"),
    ({"min_scale": -1.0}, ValueError, r"state_dict\['min_scale'\] must be >= 0"),
    ({"min_scale": 4.0, "max_scale": 2.0}, ValueError, r"max_scale.\] must be >= min_scale"),
    ({"skipped_steps": -1}, ValueError, "skipped_steps"),
])
def test_load_state_dict_is_atomic_and_checks_like_the_constructor(device, change, error, message):
    """A refused checkpoint changes nothing (before: a bad growth_interval raised after scale,
    growth and backoff were overwritten; hysteresis=0 / growth_interval=0 failed only at the next
    update(), after the params were stepped)."""
    s = mixprec.GradScaler(device, init_scale=2.0**5, growth_factor=4.0, backoff_factor=0.25,
                           growth_interval=7, hysteresis=2, min_scale=1.0)
    p = torch.nn.Parameter(torch.ones(2, device=device))
    opt = torch.optim.SGD([p], lr=0.1)
    s.scale(p.sum()).backward()
    s.step(opt)
    s.update()
    before, before_stats = s.state_dict(), s.stats()
    with pytest.raises(error, match=message):
        s.load_state_dict({**GOOD_STATE, **change})
    assert s.state_dict() == before and s.stats() == before_stats
    assert (s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval()) == (4.0, 0.25, 7)


@pytest.mark.parametrize("bad", ["scale", None, 3, ["scale"]])
@pytest.mark.parametrize("enabled", [True, False])
def test_load_state_dict_refuses_a_non_dict_with_a_type_error(device, bad, enabled):
    s = mixprec.GradScaler(device, enabled=enabled)
    before = s.state_dict()
    with pytest.raises(TypeError, match=f"state_dict must be a dict .*got {type(bad).__name__}"):
        s.load_state_dict(bad)
    assert s.state_dict() == before


def test_load_state_dict_still_takes_torch_and_tensor_scales(device):
    t = TorchGradScaler(device, init_scale=2.0**7, growth_interval=5)
    ours = mixprec.GradScaler(device)
    ours.load_state_dict(t.state_dict())
    assert ours.state_dict() == t.state_dict()
    ours.load_state_dict({**GOOD_STATE, "scale": torch.tensor(8.0), "growth_interval": 4.0})
    assert ours.get_scale() == 8.0 and ours.get_growth_interval() == 4


def test_is_a_torch_grad_scaler_that_inherits_no_code(device, monkeypatch):
    """Issue 14 item 10: isinstance(ours, torch.amp.GradScaler) holds for code that checks the
    type, yet every method torch's class has (public or private) is ours, with torch's parameter
    names, and none of torch's code runs (each of its functions is replaced by one that raises)."""
    assert issubclass(mixprec.GradScaler, TorchGradScaler)
    assert isinstance(mixprec.GradScaler(device), TorchGradScaler)
    theirs = {n: v for n, v in vars(TorchGradScaler).items() if callable(v) or isinstance(v, property)}
    assert "_unscale_grads_" in theirs and "_lazy_init_scale_growth_tracker" in theirs
    inherited = [n for n in theirs if n not in vars(mixprec.GradScaler)]
    assert inherited == []
    for name, fn in theirs.items():
        if name == "__init__":
            continue
        torch_params = list(inspect.signature(fn).parameters)
        assert list(inspect.signature(getattr(mixprec.GradScaler, name)).parameters)[:len(torch_params)] == torch_params

    def refuse(*args, **kwargs):
        raise AssertionError("torch.amp.GradScaler code ran")

    for name in theirs:
        monkeypatch.setattr(TorchGradScaler, name, refuse)
    model = make_model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = mixprec.GradScaler(device, init_scale=8.0)
    for step in range(3):
        scaler.scale(model(torch.ones(2, 8, device=device)).sum()).backward()
        if step == 1:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == 4.0 and pickle.loads(pickle.dumps(scaler)).state_dict() == scaler.state_dict()


def test_private_calls_written_against_torch_reach_ours(device):
    """What ShardedGradScaler-style code calls on a torch.amp.GradScaler, with torch's arguments,
    does on ours what it does on torch's."""
    results = {}
    for name, cls in SCALERS.items():
        model = make_model(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s = cls(device, init_scale=4.0)
        s._lazy_init_scale_growth_tracker(torch.device(device))
        scale, tracker = s._check_scale_growth_tracker("unscale_")
        s.scale(model(torch.ones(2, 8, device=device)).sum()).backward()
        next(model.parameters()).grad[0, 0] = float("nan")
        inv_scale = scale.double().reciprocal().float()
        found_inf = torch.full((), 0.0, dtype=torch.float32, device=device)
        found = s._unscale_grads_(opt, inv_scale, found_inf, False)
        state = s._per_optimizer_states[id(opt)]
        state["found_inf_per_device"] = found
        stepped = s._maybe_opt_step(opt, state)
        results[name] = (scale.item(), tracker.item(), {str(d): f.item() for d, f in found.items()},
                         stepped, [p.grad.clone() for p in model.parameters()],
                         s._get_scale_async().item(), s._found_inf_per_device(opt) is found)
    for a, b in zip(results["mixprec"], results["torch"]):
        if isinstance(a, list):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        else:
            assert a == b


def test_torch_instance_attributes_read_ours(device):
    """Code that peeks at torch's attributes of a torch.amp.GradScaler reads ours' values."""
    kwargs = {"init_scale": 2.0**7, "growth_factor": 3.0, "backoff_factor": 0.25, "growth_interval": 9}
    ours, theirs = mixprec.GradScaler(device, **kwargs), TorchGradScaler(device, **kwargs)
    for s in (ours, theirs):
        s.scale(torch.ones((), device=device))
    for name in ("_init_scale", "_init_growth_tracker", "_growth_factor", "_backoff_factor",
                 "_growth_interval", "_enabled", "_device"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert torch.equal(ours._scale, theirs._scale) and torch.equal(ours._growth_tracker, theirs._growth_tracker)
    with pytest.raises(AttributeError):
        ours._growth_factor = 5.0  # would change nothing: refused (set_growth_factor does it)
