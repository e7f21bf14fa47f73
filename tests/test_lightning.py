"""MixprecPrecision under a real Lightning Fabric (CPU): the same results as Fabric's own plugins
for the same strings, with mixprec's scaler, autocast and master-weight optimizers."""
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning", reason="lightning is not installed (pip install lightning)")
from lightning.fabric import Fabric
from lightning.fabric.plugins import DoublePrecision, HalfPrecision, MixedPrecision

import mixprec
from mixprec.integrations.lightning import MixprecPrecision


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
    other = MixprecPrecision("16-mixed")
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
