"""mixprec.Precision: parsing, every mode on the CPU, casting, master weights, the torch.amp recipe
written with Precision against torch.amp itself, mistake warnings, monitoring, checkpoints."""
import collections
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.precision import ENV_VAR, MODES, Precision, parse_precision

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ALL = ["32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]
DTYPE = {"32-true": torch.float32, "64-true": torch.float64, "16-mixed": torch.float32,
         "bf16-mixed": torch.float32, "16-true": torch.float16, "bf16-true": torch.bfloat16}


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))


def data(step, n=16, device="cpu"):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 8, generator=g).to(device)
    return x, (x[:, :4] * 2).sin()


@pytest.fixture(autouse=True)
def _quiet_hardware_advice():
    # fp16 on the CPU is slow (a warning says so); tests that check warnings record them.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*on CPU is slower than bf16-mixed")
        yield


def test_parse_precision_accepts_fabric_strings_and_ints():
    for name in ALL:
        assert parse_precision(name) == name
    assert [parse_precision(v) for v in ("32", 32, "64", 64, "16", 16, "bf16")] == [
        "32-true", "32-true", "64-true", "64-true", "16-mixed", "16-mixed", "bf16-mixed"]
    with pytest.raises(ValueError) as info:
        Precision("fp8")
    msg = str(info.value)
    assert "precision='fp8'" in msg and all(repr(name) in msg for name in ALL)
    with pytest.raises(ValueError, match="expected one of"):
        Precision(True)


def test_no_argument_reads_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert Precision().precision == "32-true"
    monkeypatch.setenv(ENV_VAR, "bf16-mixed")
    assert Precision().precision == "bf16-mixed"
    monkeypatch.setenv(ENV_VAR, "half")
    with pytest.raises(ValueError, match=r"\$MIXPREC_PRECISION='half'"):
        Precision()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ALL)
def test_every_mode_trains(name, device):
    model = make_model().to(device)
    keys = list(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prec = Precision(name, device=device)
    same, opt = prec.setup(model, opt)
    assert same is model and list(model.state_dict()) == keys
    losses = []
    for step in range(4):
        x, y = data(step, device=device)
        out = model(x)
        assert out.dtype == torch.float32  # outputs back in the default dtype: loss code unchanged
        loss = F.mse_loss(out, y)
        prec.backward(loss)
        prec.clip_grad_norm_(opt, 1.0)
        prec.step(opt)
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert {p.dtype for p in model.parameters()} == {DTYPE[name]}
    assert torch.get_default_dtype() == torch.float32
    if MODES[name].half_weights:  # master-weight optimizer, masters fp32 and the weight their rounding
        assert isinstance(opt, mixprec.optim.AdamW)
        for p in model.parameters():
            master = opt.state[p]["master_param"]
            assert master.dtype == torch.float32 and torch.equal(p, master.to(p.dtype))
    else:
        assert type(opt) is torch.optim.AdamW
    assert (prec.scaler is not None) == (name == "16-mixed")


def test_true_modes_seed_masters_with_the_exact_fp32_weights():
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, opt = Precision("bf16-true").setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n].bfloat16())
        assert torch.equal(opt.state[p]["master_param"], before[n])


def test_torch_optimizer_conversion_keeps_groups_and_hyperparameters():
    model = make_model()
    groups = [{"params": model[0].parameters(), "lr": 0.05},
              {"params": list(model[2].parameters()) + list(model[3].parameters()), "weight_decay": 0.1}]
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True)
    _, new = Precision("16-true").setup(model, opt)
    assert isinstance(new, mixprec.optim.SGD)
    assert [g["lr"] for g in new.param_groups] == [0.05, 0.01]
    assert [g["weight_decay"] for g in new.param_groups] == [0.0, 0.1]
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in new.param_groups)
    assert [p for g in new.param_groups for p in g["params"]] == [p for g in opt.param_groups for p in g["params"]]
    adam = Precision("bf16-true").setup(make_model(), torch.optim.Adam(make_model().parameters(), lr=3e-4, betas=(0.8, 0.9)))[1]
    assert isinstance(adam, mixprec.optim.Adam) and adam.defaults["betas"] == (0.8, 0.9) and adam.defaults["lr"] == 3e-4


def test_bf16_without_master_weights_and_option_errors():
    model = make_model()
    prec = Precision("bf16-true", master_weights=False, rounding="stochastic", seed=3)
    _, opt = prec.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert opt.param_groups[0]["master_weights"] is False and opt.param_groups[0]["rounding"] == "stochastic"
    x, y = data(0)
    prec.backward(F.mse_loss(model(x), y))
    prec.step(opt)
    assert all("master_param" not in s for s in opt.state.values())
    with pytest.raises(ValueError, match="master_weights=False"):
        Precision("bf16-true", rounding="stochastic")
    with pytest.raises(ValueError, match="'16-true' and 'bf16-true'"):
        Precision("bf16-mixed", master_weights=False)
    with pytest.raises(ValueError, match="rounding must be one of"):
        Precision("bf16-true", master_weights=False, rounding="up")


def test_other_optimizers_need_master_weights_off():
    model = make_model()
    with pytest.raises(TypeError, match=r"AdamW, Adam and SGD.*RMSprop.*master_weights=False"):
        Precision("bf16-true").setup(model, torch.optim.RMSprop(model.parameters()))
    opt = torch.optim.RMSprop(model.parameters())
    assert Precision("bf16-true", master_weights=False).setup(model, opt)[1] is opt
    with pytest.raises(ValueError, match="64-true"):
        Precision("64-true").setup(make_model(), mixprec.optim.AdamW(make_model().parameters()))


Pair = collections.namedtuple("Pair", "a b")


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, extra, *, kw):
        self.seen = (x.dtype, extra["f"].dtype, extra["i"].dtype, extra["list"][0].dtype,
                     extra["pair"].b.dtype, kw.dtype, torch.zeros(1).dtype)
        return {"out": self.lin(x.to(self.lin.weight.dtype)), "n": 3}


@pytest.mark.parametrize("name", ALL)
def test_inputs_cast_as_fabric_does(name):
    model = Recorder()
    prec = Precision(name)
    prec.setup(model)
    extra = {"f": torch.ones(2), "i": torch.ones(2, dtype=torch.long), "list": [torch.ones(1)],
             "pair": Pair(1, torch.ones(1))}
    out = model(torch.ones(1, 2), extra, kw=torch.ones(1))
    true_dtype = torch.float32 if MODES[name].mixed else MODES[name].dtype
    assert model.seen == (true_dtype,) * 2 + (torch.long,) + (true_dtype,) * 4
    assert out["out"].dtype == torch.float32 and out["n"] == 3
    if name == "64-true":
        assert model.lin.weight.dtype == torch.float64


def test_set_up_model_copies_pickles_and_keeps_its_keys():
    model = make_model()
    prec = Precision("bf16-true")
    prec.setup(model)
    prec.setup(model)  # twice: still one wrapper
    assert model.__dict__["forward"].inner is None
    twin = copy.deepcopy(model)
    x = torch.randn(3, 8)
    assert torch.equal(twin(x), model(x))
    with torch.no_grad():
        twin[0].weight.zero_()
    assert not torch.equal(twin(x), model(x))  # the copy runs its own weights
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(restored(x), model(x)) and list(restored.state_dict()) == list(model.state_dict())


def _recipe(use_mixprec, name, device="cpu", steps=12):
    """torch.amp's documented recipe (autocast, scaled backward, unscale_ + clip, step, update,
    validation under no_grad + autocast), written once with mixprec.Precision, once with torch.amp."""
    model = make_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dtype = MODES[name].dtype
    if use_mixprec:
        scaler = mixprec.GradScaler(device, growth_interval=3) if name == "16-mixed" else None
        prec = Precision(name, device=device, scaler=scaler)
        model, opt = prec.setup(model, opt)
    else:
        scaler = torch.amp.GradScaler(device, growth_interval=3, enabled=name == "16-mixed")
    losses, val = [], []
    for step in range(steps):
        x, y = data(step, device=device)
        if use_mixprec:
            with prec.autocast():
                loss = F.mse_loss(model(x), y)
            prec.backward(loss)
            prec.clip_grad_norm_(opt, 0.5)
            prec.step(opt)
        else:
            with torch.autocast(device, dtype=dtype):
                loss = F.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        losses.append(loss.detach())
        xv, yv = data(10_000 + step, device=device)
        with torch.no_grad(), (prec.autocast() if use_mixprec else torch.autocast(device, dtype=dtype)):
            val.append(F.mse_loss(model(xv), yv))
    scale = prec.stats()["scale"] if use_mixprec else scaler.get_scale()
    return torch.stack(losses), torch.stack(val), [p.detach() for p in model.parameters()], scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["16-mixed", "bf16-mixed"])
def test_recipe_equals_torch_amp_bit_for_bit(name, device):
    # Exact: the same torch.optim.AdamW in both loops, mixprec.GradScaler is bit-identical to
    # torch.amp's, mixprec.autocast's default policy is torch's, and casting the fp16 output to
    # fp32 before the loss is the cast autocast itself makes for mse_loss.
    ours, theirs = _recipe(True, name, device), _recipe(False, name, device)
    for a, b in zip(ours[:3], theirs[:3]):
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(u, v)
    assert ours[3] == theirs[3]
    if name == "16-mixed":  # the run did exercise overflow skips and growth
        assert ours[3] != 2.0**16


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


def test_unscaled_backward_warns_once_and_steps_the_true_grads():
    model, ref = make_model(), make_model()
    prec = Precision("16-mixed", device="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    prec.setup(model)

    def loop():
        for step in range(3):
            x, y = data(step)
            F.mse_loss(model(x), y).backward()  # the mistake: not prec.backward(loss)
            prec.clip_grad_norm_(opt, 0.5)
            prec.step(opt)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):  # the right thing, by hand
                out = ref(x)
            F.mse_loss(out.float(), y).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            ref_opt.step()
            ref_opt.zero_grad()

    messages = [m for m in _warnings_of(loop) if "not produced by prec.backward" in m]
    assert len(messages) == 1 and "Call prec.backward(loss)" in messages[0]
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert prec.stats()["scale"] == 2.0**16  # the scale was not involved


def test_clipping_scaled_grads_warns_once_naming_the_fix():
    model = make_model()
    prec = Precision("16-mixed", device="cpu", scaler=mixprec.GradScaler("cpu", init_scale=2.0**4))
    model, opt = prec.setup(model, mixprec.optim.AdamW(model.parameters()))

    def loop():
        for step in range(3):
            x, y = data(step)
            prec.backward(F.mse_loss(model(x), y))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the mistake: scaled grads
            prec.step(opt)
            opt.zero_grad()

    messages = [m for m in _warnings_of(loop) if "modified in place after prec.backward()" in m]
    assert len(messages) == 1 and "prec.clip_grad_norm_(optimizer, max_norm)" in messages[0]

    def right():  # unscale_ first, then any edit: no warning
        x, y = data(0)
        prec.backward(F.mse_loss(model(x), y))
        prec.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        prec.step(opt)

    assert _warnings_of(right) == []


def test_fp16_on_cpu_warns_once_at_setup_naming_bf16():
    def go():
        prec = Precision("16-mixed")
        prec.setup(make_model())
        prec.setup(make_model())
        Precision("bf16-mixed").setup(make_model())
    messages = [m for m in _warnings_of(go) if "slower" in m]
    assert messages == [("16-mixed on CPU is slower than bf16-mixed (CPUs have no fast fp16 arithmetic, and fp16 "
                         "needs loss scaling): use Precision('bf16-mixed')")]
    assert len([m for m in _warnings_of(lambda: Precision("16-true", device="cpu")) if "bf16-mixed" in m]) == 1


def test_scaler_step_twice_warns_with_the_fix_and_raises_torchs_error():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = mixprec.GradScaler("cpu")
    x, y = data(0)
    scaler.scale(F.mse_loss(model(x), y)).backward()
    scaler.step(opt)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError, match=r"^step\(\) has already been called since the last update\(\)\.$"):
                scaler.step(opt)
        if _ == 0:
            assert len(caught) == 1 and "call scaler.update()" in str(caught[0].message)
        else:
            assert caught == []  # once


def test_overflow_monitoring_names_the_params():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x) + self.b(x * 1e4)

    torch.manual_seed(0)
    model = Two()
    with torch.no_grad():
        model.b.weight.mul_(1e-4)  # b's output is moderate, its weight grad (input 1e4) is not
    prec = Precision("16-mixed", device="cpu", track_overflow_names=True,
                     scaler=mixprec.GradScaler("cpu", init_scale=2.0**10))
    model, opt = prec.setup(model, mixprec.optim.AdamW(model.parameters()))
    x, y = data(0)
    with prec.autocast():
        loss = F.mse_loss(model(x), y)
    prec.backward(loss)
    assert "b.weight" in prec.stats(model)["overflow_params"]  # scanning the grads now
    prec.step(opt)
    stats = prec.stats()
    assert stats["skipped_steps"] == stats["overflows"] == 1 and stats["scale"] == 2.0**9
    assert "b.weight" in stats["overflow_params"] and not any(n.startswith("a.") for n in stats["overflow_params"])
    assert Precision("bf16-mixed").stats() == {"precision": "bf16-mixed", "scale": 1.0, "skipped_steps": 0,
                                               "overflows": 0, "overflow_params": [],
                                               "scale_at_floor": False, "nonfinite_since_step": None}


def test_validation_under_no_grad_needs_no_scaler():
    model = make_model()
    prec = Precision("16-mixed", device="cpu")
    prec.setup(model)
    with torch.no_grad(), prec.autocast():
        out = model(torch.randn(2, 8))
    # inside a region the output stays as autocast made it (the caller's code is autocast too)
    assert out.dtype == torch.float16 and not out.requires_grad
    with torch.no_grad():
        assert model(torch.randn(2, 8)).dtype == torch.float32  # outside: back in fp32
    assert prec.stats()["scale"] == 2.0**16 and prec.scaler.loss_scaler.scale is None


def test_checkpoint_round_trip():
    model = make_model()
    prec = Precision("16-mixed", device="cpu", scaler=mixprec.GradScaler("cpu", init_scale=2.0**20, growth_interval=2))
    model, opt = prec.setup(model, mixprec.optim.AdamW(model.parameters()))
    for step in range(5):
        x, y = data(step)
        prec.backward(F.mse_loss(model(x), y))
        prec.step(opt)
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save({"precision": prec.state_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    fresh = Precision("16-mixed", device="cpu")
    fresh.load_state_dict(ckpt["precision"])
    assert fresh.state_dict() == prec.state_dict() and fresh.stats()["scale"] == prec.stats()["scale"]
    assert set(ckpt["model"]) == set(make_model().state_dict())
    torch_scaler = torch.amp.GradScaler("cpu")
    torch_scaler.load_state_dict(ckpt["precision"])  # torch.amp's format
    assert torch_scaler.get_scale() == prec.stats()["scale"]
    assert Precision("bf16-mixed").state_dict() == {}
    with pytest.raises(RuntimeError, match="source state dict is empty"):
        Precision("16-mixed", device="cpu").load_state_dict({})


def test_public_device_and_warning_hooks_for_wrappers():
    """What a wrapper (the Fabric plugin) uses: device / set_device() and warn_once()."""
    prec = Precision("16-mixed")
    assert prec.device is None
    messages = _warnings_of(lambda: prec.set_device("cpu"))
    assert prec.device == torch.device("cpu") and len([m for m in messages if "on CPU is slower" in m]) == 1
    assert _warnings_of(lambda: prec.set_device(torch.device("cpu"))) == []  # advice is given once
    assert _warnings_of(lambda: [prec.warn_once("k", "said once") for _ in range(3)]) == ["said once"]


def test_nonfinite_grad_names_reads_the_grads_without_touching_them():
    from mixprec.precision import nonfinite_grad_names
    model = make_model()
    F.mse_loss(model(data(0)[0]), data(0)[1]).backward()
    assert nonfinite_grad_names(model.named_parameters()) == []
    model[3].bias.grad[1] = float("inf")
    model[0].weight.grad[2, 3] = float("nan")
    versions = [p.grad._version for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    assert nonfinite_grad_names(model.named_parameters()) == ["0.weight", "3.bias"]
    assert [p.grad._version for p in model.parameters()] == versions  # read only: no warning later
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num())


def test_16_mixed_reports_a_scale_stuck_at_its_floor():
    """Issue 14 item 24: every step non-finite drives the scale to GradScaler's floor (2**-24),
    never to 0; Precision's stats say so and since when, and one warning names the cause."""
    model = make_model()
    prec = Precision("16-mixed", device="cpu")
    model, opt = prec.setup(model, mixprec.optim.AdamW(model.parameters(), lr=1e-2))
    x, y = data(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(60):
            with prec.autocast():
                loss = F.mse_loss(model(x), y) * float("nan")
            prec.backward(loss)
            prec.step(opt)
            opt.zero_grad()
        stats = prec.stats()
    floor_warnings = [str(w.message) for w in caught if "floor" in str(w.message)]
    assert len(floor_warnings) == 1 and "every step non-finite since step 1 " in floor_warnings[0]
    assert stats["scale"] == 2.0**-24 and stats["skipped_steps"] == 60
    assert stats["scale_at_floor"] is True and stats["nonfinite_since_step"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_64_true_setup_keeps_complex_buffers():
    """Issue 14 item 14: floating tensors are cast, complex ones keep their dtype and values."""
    model = make_model()
    spectrum = torch.complex(torch.randn(5), torch.randn(5)).to(torch.complex128)
    model.register_buffer("spectrum", spectrum.clone())
    Precision("64-true").setup(model)
    assert model.spectrum.dtype == torch.complex128 and torch.equal(model.spectrum, spectrum)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_true_mode_options_reach_a_default_mixprec_optimizer():
    """Issue 14 item 19: master_weights=False / rounding / seed are applied to a mixprec.optim
    optimizer built with the defaults, giving the run of one built with those options."""
    def run(prec, opt_kwargs):
        model = make_model()
        model, opt = prec.setup(model, mixprec.optim.AdamW(model.parameters(), lr=1e-2, **opt_kwargs))
        for step in range(3):
            x, y = data(step)
            prec.backward(F.mse_loss(model(x), y))
            prec.step(opt)
            opt.zero_grad()
        return model, opt

    model, opt = run(Precision("bf16-true", master_weights=False, rounding="stochastic", seed=9), {})
    ref, _ = run(Precision("bf16-true", master_weights=False, rounding="stochastic"),
                 {"master_weights": False, "rounding": "stochastic", "seed": 9})
    assert (opt.param_groups[0]["master_weights"], opt.param_groups[0]["rounding"]) == (False, "stochastic")
    assert all("master_param" not in s for s in opt.state.values())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    # the optimizer's own options stand when the Precision has the defaults (a warning says so)
    messages = _warnings_of(lambda: run(Precision("bf16-true"), {"master_weights": False, "rounding": "kahan"}))
    assert any("keeps its own master_weights=False, rounding='kahan'" in m for m in messages)


def test_scaler_is_assignable_and_checked():
    prec = Precision("16-mixed", device="cpu")
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**3)
    prec.scaler = torch_scaler  # torch's kind: backward, unscale_, clip and step use it
    model = make_model()
    model, opt = prec.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = data(0)
    prec.backward(F.mse_loss(model(x), y))
    prec.unscale_(opt)
    prec.unscale_(opt)  # once per iteration: the second does nothing
    norm = prec.clip_grad_norm_(opt, 1e-3)
    assert norm > 1e-3 and prec.step(opt) is None and prec.stats()["scale"] == 8.0
    with pytest.raises(TypeError, match="scaler must be a GradScaler"):
        prec.scaler = object()
    with pytest.raises(ValueError, match="scaler= is for '16-mixed'"):
        Precision("bf16-mixed").scaler = mixprec.GradScaler("cpu")
    prec.scaler = None
    assert prec.scaler is None and prec.state_dict() == {}


def test_stepping_the_replaced_optimizer_warns_naming_the_fix():
    """Issue 14 item 25: setup() replaced a torch optimizer; stepping the old one trains the
    half weights without master weights."""
    model = make_model()
    old = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prec = Precision("bf16-true")
    model, new = prec.setup(model, old)
    x, y = data(0)

    def loop():
        for _ in range(3):
            prec.backward(F.mse_loss(model(x), y))
            old.step()  # the mistake
            old.zero_grad()

    messages = [m for m in _warnings_of(loop) if "the old optimizer was stepped" in m]
    assert len(messages) == 1 and "Step the optimizer setup() returned" in messages[0]
    assert "torch.optim.adamw.AdamW" in messages[0] and "mixprec.optim.AdamW" in messages[0]
    prec.backward(F.mse_loss(model(x), y))
    assert [m for m in _warnings_of(lambda: new.step()) if "old optimizer" in m] == []


def test_scheduler_built_before_setup_warns_naming_the_fix():
    """Issue 14 item 25: a scheduler made over the optimizer setup() replaces schedules nothing."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    messages = [m for m in _warnings_of(lambda: Precision("16-true").setup(model, opt))
                if "LR scheduler was created over the old optimizer" in m]
    assert len(messages) == 1 and "Create the scheduler after setup()" in messages[0]
    model = make_model()  # made after setup, over the new optimizer: nothing to say
    _, new = Precision("16-true").setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert [m for m in _warnings_of(lambda: torch.optim.lr_scheduler.StepLR(new, step_size=1))
            if "scheduler" in m] == []
