"""MixprecPrecision under a real Lightning Fabric (CPU): the same results as Fabric's own plugins
for the same strings, with mixprec's scaler, autocast and master-weight optimizers; the plugin's
interface side by side with Fabric's plugins (issue 14 items 14-16, 18-20)."""
import collections
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning", reason="lightning is not installed (pip install lightning)")
from lightning.fabric import Fabric
from lightning.fabric.plugins import DoublePrecision, HalfPrecision, MixedPrecision
from lightning.fabric.plugins import Precision as FabricPrecision

import mixprec
from mixprec.integrations.lightning import MixprecPrecision, clip_gradients


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def train(fabric, model, opt, steps=8, clip=True):
    model, opt = fabric.setup(model, opt)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 8, generator=g)
        loss = F.mse_loss(model(x), x[:, :4].sin())
        fabric.backward(loss)
        if clip:
            fabric.clip_gradients(model, opt, max_norm=0.5, error_if_nonfinite=False)
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return model, opt, torch.stack(losses)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*on CPU is slower than bf16-mixed")
        warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
        yield


def _fabric_run(precision, optimizer_cls, **kwargs):
    plugin = MixprecPrecision(precision, **kwargs)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    model = make_model()
    return plugin, fabric, train(fabric, model, optimizer_cls(model.parameters(), lr=1e-2))


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "64-true", "bf16-true"])
def test_matches_fabrics_plugin_for_the_same_string(precision):
    # Exact: the same torch.optim.AdamW, a GradScaler bit-identical to torch.amp's, autocast with
    # torch's policy, Fabric's input/output casting and clip_gradients path.
    kwargs = {"scaler": mixprec.GradScaler("cpu", growth_interval=2)} if precision == "16-mixed" else {}
    plugin, fabric, (model, _opt, losses) = _fabric_run(precision, torch.optim.AdamW, **kwargs)
    assert fabric.strategy.precision is plugin
    fabric_plugin = {  # explicit: on the CPU Fabric itself would turn "16-mixed" into bf16
        "16-mixed": lambda: MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", growth_interval=2)),
        "bf16-mixed": lambda: MixedPrecision("bf16-mixed", "cpu"),
        "64-true": DoublePrecision, "bf16-true": lambda: HalfPrecision("bf16-true")}[precision]()
    reference = Fabric(accelerator="cpu", devices=1, plugins=[fabric_plugin])
    ref_model = make_model()
    _, _, ref_losses = train(reference, ref_model, torch.optim.AdamW(ref_model.parameters(), lr=1e-2))
    assert torch.equal(losses, ref_losses)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    if precision == "16-mixed":
        assert isinstance(plugin.scaler, mixprec.GradScaler) and plugin.scaler.get_scale() != 2.0**16


def test_16_mixed_with_mixprec_adamw_and_checkpoint():
    plugin, _, (_model, _opt, losses) = _fabric_run("16-mixed", mixprec.optim.AdamW,
                                                    scaler=mixprec.GradScaler("cpu", init_scale=2.0**8))
    assert losses[-1] < losses[0]
    state = plugin.state_dict()
    assert state["scale"] == plugin.scaler.get_scale()
    other = MixprecPrecision("16-mixed", scaler=mixprec.GradScaler("cpu"))
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_bf16_true_keeps_fp32_masters_with_mixprec_optimizers():
    _, _, (model, opt, losses) = _fabric_run("bf16-true", mixprec.optim.AdamW)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        master = opt.optimizer.state[p]["master_param"]
        assert master.dtype == torch.float32 and torch.equal(p, master.bfloat16())
    assert losses[-1] < losses[0]


def test_bf16_true_with_a_torch_optimizer_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fabric_run("bf16-true", torch.optim.AdamW)
    messages = [str(w.message) for w in caught if "no fp32 master weights" in str(w.message)]
    assert len(messages) == 1 and "mixprec.optim.AdamW" in messages[0]


def _recorded(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


# -- item 14: complex buffers ------------------------------------------------------------------------
class WithComplex(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 2)
        self.register_buffer("spectrum", torch.complex(torch.randn(5), torch.randn(5)).to(torch.complex128))

    def forward(self, x):
        return self.lin(x) * self.spectrum.abs().sum().to(x.dtype)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "16-true"])
def test_convert_module_keeps_complex_buffers(precision):
    module = WithComplex()
    before = module.spectrum.clone()
    plugin = MixprecPrecision(precision)
    assert plugin.convert_module(module) is module
    assert module.spectrum.dtype == torch.complex128 and torch.equal(module.spectrum, before)
    assert module.lin.weight.dtype == plugin._desired_input_dtype
    if precision == "64-true":  # what Fabric's DoublePrecision does, tensor for tensor
        ref = DoublePrecision().convert_module(WithComplex())
        for (n, t), (_, r) in zip(module.state_dict().items(), ref.state_dict().items()):
            assert t.dtype == r.dtype and torch.equal(t, r), n
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixprecPrecision("64-true")])
        model = fabric.setup(WithComplex())
        assert model.spectrum.dtype == torch.complex128 and model(torch.ones(1, 4)).dtype == torch.float32


# -- item 16: the plugin's interface next to Fabric's plugins ----------------------------------------------
Pair = collections.namedtuple("Pair", "a b")


def _fabric_plugin(precision):
    return {"32-true": FabricPrecision, "64-true": DoublePrecision,
            "16-mixed": lambda: MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu")),
            "bf16-mixed": lambda: MixedPrecision("bf16-mixed", "cpu"),
            "16-true": lambda: HalfPrecision("16-true"), "bf16-true": lambda: HalfPrecision("bf16-true")}[precision]()


def _dtypes(data):
    if isinstance(data, torch.Tensor):
        return data.dtype
    if isinstance(data, dict):
        return {k: _dtypes(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data).__name__, [_dtypes(v) for v in data]
    return data


def _context_state():
    return (torch.get_default_dtype(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
            torch.zeros(1).dtype)


@pytest.mark.parametrize("precision", ["32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"])
def test_interface_behaves_as_fabrics_plugin(precision):
    kwargs = {"scaler": mixprec.GradScaler("cpu")} if precision == "16-mixed" else {}
    ours, theirs = MixprecPrecision(precision, device="cpu", **kwargs), _fabric_plugin(precision)
    assert ours.precision == theirs.precision == precision
    assert ours._desired_input_dtype == getattr(theirs, "_desired_input_dtype", {
        "32-true": torch.float32, "64-true": torch.float64}.get(precision))
    if isinstance(theirs, MixedPrecision):
        assert ours.device == theirs.device == "cpu"
        assert ours.forward_context().fast_dtype == theirs.forward_context().fast_dtype
    assert (ours.scaler is None) == (theirs.scaler is None if hasattr(theirs, "scaler") else True)
    for context in ("forward_context", "tensor_init_context", "module_init_context"):
        with getattr(ours, context)():
            mine = _context_state()
            made = torch.nn.Linear(2, 2).weight.dtype
        with getattr(theirs, context)():
            assert _context_state() == mine, context
            assert torch.nn.Linear(2, 2).weight.dtype == made, context
        assert torch.get_default_dtype() == torch.float32
    data = {"x": torch.ones(2), "idx": torch.arange(3), "nested": [torch.ones(1, dtype=torch.float64),
            Pair(1, torch.ones(1, dtype=torch.bfloat16))], "text": "keep"}
    assert _dtypes(ours.convert_input(data)) == _dtypes(theirs.convert_input(data))
    assert _dtypes(ours.convert_output(data)) == _dtypes(theirs.convert_output(data))
    mine, ref = ours.convert_module(make_model()), theirs.convert_module(make_model())
    assert [p.dtype for p in mine.parameters()] == [p.dtype for p in ref.parameters()]


def test_assigned_scaler_is_the_one_used():
    plugin = MixprecPrecision("16-mixed", scaler=mixprec.GradScaler("cpu", init_scale=2.0**4))
    # A torch.amp.GradScaler assigned: backward scales by its scale, the step is its step + update.
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**3, growth_interval=1)
    plugin.scaler = torch_scaler
    assert plugin.scaler is torch_scaler and plugin.mixprec.scaler is torch_scaler
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    loss = model(x).float().pow(2).mean()
    plugin.backward(loss, model)
    ref = make_model()
    (ref(x).pow(2).mean() * 8).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
    plugin.optimizer_step(opt)
    assert torch_scaler.get_scale() == 16.0  # its update() ran (growth_interval=1)
    # Any object with the scaler's methods is called as Fabric's MixedPrecision calls it.
    fake = mock.Mock()
    fake.scale = mock.Mock(side_effect=lambda t: t)
    plugin.scaler = fake
    tensor = mock.Mock()
    plugin.backward(tensor, None, "arg", key="word")
    fake.scale.assert_called_once_with(tensor)
    tensor.backward.assert_called_once_with("arg", key="word")
    optimizer = mock.Mock()
    plugin.optimizer_step(optimizer, key="word")
    fake.step.assert_called_once_with(optimizer, key="word")
    fake.update.assert_called_once_with()
    # None turns scaling off: plain backward and step.
    plugin.scaler = None
    model, ref = make_model(), make_model()
    plugin.backward(model(x).float().pow(2).mean(), model)
    ref(x).pow(2).mean().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
    with pytest.raises(TypeError, match="scaler must be a GradScaler"):
        plugin.scaler = "dynamic"
    with pytest.raises(ValueError, match="scaler= is for '16-mixed'"):
        MixprecPrecision("bf16-mixed").scaler = mixprec.GradScaler("cpu")


# -- item 15: 16-mixed on "cuda" without CUDA ---------------------------------------------------------
def test_16_mixed_for_cuda_without_cuda_warns_and_disables_the_scaler(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ours, our_warnings = _recorded(lambda: MixprecPrecision("16-mixed", device="cuda"))
    theirs, their_warnings = _recorded(lambda: MixedPrecision("16-mixed", device="cuda"))
    assert [m for m in our_warnings if "CUDA is not available" in m] == their_warnings
    assert ours.precision == "16-mixed" and ours.device == "cuda"
    assert ours.scaler.is_enabled() is theirs.scaler.is_enabled() is False
    params = []
    for plugin in (ours, theirs):  # autocast off (torch says so), backward unscaled, a plain step
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with plugin.forward_context():
                out = model(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
        assert out.dtype == torch.float32 and any("CUDA is not available" in str(w.message) for w in caught)
        plugin.backward(out.pow(2).mean(), model)
        plugin.optimizer_step(opt)
        params.append(list(model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(*params))
    assert ours.state_dict() == theirs.state_dict() == {}


def _train_sgd(fabric, steps=3):
    model = make_model()
    _, _, losses = train(fabric, model, torch.optim.SGD(model.parameters(), lr=0.1), steps=steps, clip=False)
    return losses


# -- item 20: "16-mixed" on the CPU is bf16, as Fabric's ----------------------------------------------------
def test_16_mixed_on_the_cpu_switches_to_bf16_as_fabric(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plugin, messages = _recorded(lambda: MixprecPrecision("16-mixed"))
    assert plugin.precision == "bf16-mixed" and plugin.scaler is None and plugin.device == "cpu"
    switch = [m for m in messages if "AMP with fp16 is not supported on CPU" in m]
    assert len(switch) == 1 and "Using 'bf16-mixed' instead" in switch[0]
    stock, stock_messages = _recorded(lambda: Fabric(accelerator="cpu", devices=1, precision="16-mixed"))
    assert any("Using `precision='bf16-mixed'` instead" in m for m in stock_messages)
    assert stock.strategy.precision.precision == "bf16-mixed"
    ours_fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    assert torch.equal(_train_adamw(ours_fabric), _train_adamw(stock))
    assert MixprecPrecision("16-mixed", device="cpu", scaler=mixprec.GradScaler("cpu")).precision == "16-mixed"


def test_16_mixed_switches_when_it_first_sees_cpu_inputs(monkeypatch):
    # A GPU machine running Fabric(accelerator="cpu"): the device shows with the first inputs.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plugin = MixprecPrecision("16-mixed")
    assert plugin.precision == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out, messages = _recorded(lambda: plugin.convert_input(torch.ones(2)))
    assert plugin.precision == "bf16-mixed" and plugin.scaler is None and out.dtype == torch.bfloat16
    assert len([m for m in messages if "Using 'bf16-mixed' instead" in m]) == 1


def _train_adamw(fabric, steps=4):
    model = make_model()
    _, _, losses = train(fabric, model, torch.optim.AdamW(model.parameters(), lr=1e-2), steps=steps)
    return losses


# -- item 18: clipping mixprec.optim optimizers -------------------------------------------------------------
def test_clipping_under_our_plugin_and_under_fabrics_stock_plugin():
    # Ours: fabric.clip_gradients unscales through mixprec, then clips; the same numbers as the
    # stock plugin clipping torch's fused AdamW through clip_gradients() (Fabric's own
    # clip_gradients refuses optimizers that unscale in their step).
    # Every param a multiple of 8 elements: mixprec's CPU AdamW leaves torch's fused one by an
    # ulp in its scalar tail (other sizes), which is not what this test is about.
    def run(plugin, opt_cls, clip):
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        model, opt = fabric.setup(model, opt_cls(model.parameters(), lr=1e-2))
        losses, norms = [], []
        for step in range(6):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            loss = F.mse_loss(model(x), x.sin())
            fabric.backward(loss)
            norms.append(clip(fabric, model, opt))
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return torch.stack(losses), torch.stack(norms), model

    def scaler():
        return {"init_scale": 2.0**10, "growth_interval": 2}

    ours = run(MixprecPrecision("16-mixed", scaler=mixprec.GradScaler("cpu", **scaler())), mixprec.optim.AdamW,
               lambda f, m, o: f.clip_gradients(m, o, max_norm=0.05))
    stock_plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", **scaler()))
    fused = lambda params, lr: torch.optim.AdamW(params, lr=lr, fused=True)
    with pytest.raises(NotImplementedError, match="optimizers handling the unscaling"):
        run(stock_plugin, fused, lambda f, m, o: f.clip_gradients(m, o, max_norm=0.05))
    stock = run(MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", **scaler())), fused,
                lambda f, m, o: clip_gradients(f.strategy.precision, o, 0.05))
    assert torch.equal(ours[0], stock[0]) and torch.equal(ours[1], stock[1])
    assert all(torch.equal(p, q) for p, q in zip(ours[2].parameters(), stock[2].parameters()))
    # Stock plugin, mixprec's scaler and optimizer: one read of the scaled grads, the clip in the step.
    folded = run(MixedPrecision("16-mixed", "cpu", mixprec.GradScaler("cpu", **scaler())), mixprec.optim.AdamW,
                 lambda f, m, o: clip_gradients(f.strategy.precision, o, 0.05))
    # (its norm comes from one read of the scaled grads: within an ulp of torch's, issue 14 item 22)
    torch.testing.assert_close(folded[0], ours[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded[1], ours[1], rtol=1e-5, atol=1e-6)
    assert (ours[1] > 0.05).all()  # every step was clipped
    unclipped = run(MixprecPrecision("16-mixed", scaler=mixprec.GradScaler("cpu", **scaler())),
                    mixprec.optim.AdamW, lambda f, m, o: torch.zeros(()))
    assert not torch.equal(unclipped[0], ours[0])


# -- item 19: the plugin's master_weights / rounding reach a mixprec.optim optimizer ----------------------
def test_true_mode_options_are_applied_to_a_default_mixprec_optimizer():
    _, _, (model, opt, losses) = _fabric_run("bf16-true", mixprec.optim.AdamW, master_weights=False,
                                             rounding="stochastic", seed=7)
    group = opt.optimizer.param_groups[0]
    assert (group["master_weights"], group["rounding"], group["seed"]) == (False, "stochastic", 7)
    assert all("master_param" not in s for s in opt.optimizer.state.values())
    # the same run as an optimizer built with those options under Fabric's HalfPrecision
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[HalfPrecision("bf16-true")])
    ref = make_model()
    _, _, ref_losses = train(fabric, ref, mixprec.optim.AdamW(ref.parameters(), lr=1e-2, master_weights=False,
                                                              rounding="stochastic", seed=7))
    assert torch.equal(losses, ref_losses)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_true_mode_options_that_cannot_apply_are_refused_naming_the_fix():
    def step_with(plugin, opt_factory):
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
        model = make_model()
        return train(fabric, model, opt_factory(model.parameters()), steps=1)

    with pytest.raises(ValueError, match=r"set them in one place"):
        step_with(MixprecPrecision("bf16-true", master_weights=False, rounding="stochastic"),
                  lambda p: mixprec.optim.AdamW(p, master_weights=False, rounding="kahan"))
    with pytest.raises(TypeError, match=r"rounding='kahan'.*pass mixprec.optim.AdamW"):
        step_with(MixprecPrecision("bf16-true", master_weights=False, rounding="kahan"), torch.optim.AdamW)
    # an optimizer that already stepped with master weights: refused, and left unchanged
    model = make_model().bfloat16()
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    plugin = MixprecPrecision("bf16-true", master_weights=False, rounding="stochastic")
    with pytest.raises(ValueError, match=r"already stepped.*mixprec.optim.AdamW\(params, \.\.\., master_weights=False"):
        plugin.optimizer_step(opt)
    assert opt.param_groups[0]["master_weights"] is True and opt.param_groups[0]["rounding"] == "nearest"
