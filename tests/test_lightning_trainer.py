"""MixprecTrainerPrecision under a real Lightning Trainer.fit on the CPU (issue 14 items 17-20):
the same losses and weights as the Trainer's own plugins for the same string, clipping for
mixprec.optim optimizers, and the plugin's options and master weights."""
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning", reason="lightning is not installed (pip install lightning)")
import lightning.pytorch as pl
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

import mixprec
from mixprec.integrations.lightning import clip_gradients
from mixprec.integrations.lightning_trainer import MixprecTrainerPrecision


class Tiny(pl.LightningModule):
    def __init__(self, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-3), own_clipping=False):
        super().__init__()
        torch.manual_seed(0)
        # every param a multiple of 8 elements (mixprec's CPU AdamW and torch's fused one then agree bit for bit)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.make_optimizer, self.own_clipping = optimizer, own_clipping
        self.losses, self.norms = [], []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x).float(), y.float())
        self.losses.append(loss.detach().float())
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.own_clipping:  # what lets Lightning's stock plugins clip mixprec.optim optimizers
            self.norms.append(clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val,
                                             gradient_clip_algorithm))
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def fit(model, clip=0.5, batches=4, **trainer_kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * batches, 8, generator=g)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=batches,
                         gradient_clip_val=clip, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # advice, the CPU bf16 switch, dataloader workers
        trainer.fit(model, DataLoader(TensorDataset(x, (2 * x).sin()), batch_size=8))
    return trainer, torch.stack(model.losses), [p.detach() for p in model.parameters()]


def same(a, b):
    return torch.equal(a[1], b[1]) and all(torch.equal(p, q) for p, q in zip(a[2], b[2]))


@pytest.mark.parametrize("precision", ["32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"])
def test_fit_equals_the_trainers_own_plugin(precision):
    # torch.optim.AdamW in both, clipped by norm; "16-mixed" on the CPU is bf16-mixed in both.
    ours = fit(Tiny(), plugins=[MixprecTrainerPrecision(precision)])
    stock = fit(Tiny(), precision=precision)
    assert ours[0].precision_plugin.precision == stock[0].precision_plugin.precision
    assert same(ours, stock), (ours[1], stock[1])
    assert torch.isfinite(ours[1]).all() and len(ours[1]) == 4
    assert [p.dtype for p in ours[2]] == [p.dtype for p in stock[2]]


def test_fit_16_mixed_with_a_scaler_equals_the_trainers_mixed_precision():
    ours = fit(Tiny(), plugins=[MixprecTrainerPrecision("16-mixed", scaler=mixprec.GradScaler("cpu", growth_interval=1))])
    stock = fit(Tiny(), plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", growth_interval=1))])
    assert ours[0].precision == "16-mixed" and same(ours, stock)
    assert ours[0].scaler.get_scale() == stock[0].scaler.get_scale() != 2.0**16  # the scale moved


def fused_torch(params):
    return torch.optim.AdamW(params, lr=1e-2, fused=True)


def ours_adamw(params):
    return mixprec.optim.AdamW(params, lr=1e-2)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gradient_clip_val_clips_mixprec_optimizers(precision):
    scaler = {"scaler": mixprec.GradScaler("cpu", init_scale=2.0**10)} if precision == "16-mixed" else {}
    stock_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if precision == "16-mixed" else None
    # The Trainer's MixedPrecision refuses, even under bf16-mixed where nothing is scaled.
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit(Tiny(ours_adamw), plugins=[MixedPrecision(precision, "cpu", stock_scaler)])
    # Ours clips through the optimizer's fused path: the numbers of torch's fused AdamW clipped by
    # clip_gradients() under the stock plugin (torch's unscale_ + clip_grad_norm_).
    ours = fit(Tiny(ours_adamw), clip=0.05, plugins=[MixprecTrainerPrecision(precision, **scaler)])
    stock_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if precision == "16-mixed" else None
    reference = Tiny(fused_torch, own_clipping=True)
    stock = fit(reference, clip=0.05, plugins=[MixedPrecision(precision, "cpu", stock_scaler)])
    assert all(n > 0.05 for n in reference.norms)  # every step was clipped
    torch.testing.assert_close(ours[1], stock[1], rtol=1e-5, atol=1e-6)  # the norm: issue 14 item 22
    for p, q in zip(ours[2], stock[2]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    unclipped = fit(Tiny(ours_adamw), clip=None, plugins=[MixprecTrainerPrecision(precision, **scaler)])
    assert not torch.equal(unclipped[1], ours[1])


def test_stock_plugins_clip_mixprec_optimizers_through_clip_gradients():
    # mixprec's optimizer and scaler under the Trainer's stock MixedPrecision: clip_gradients()
    # from configure_gradient_clipping; the same run as torch's fused AdamW and torch.amp's scaler.
    model = Tiny(ours_adamw, own_clipping=True)
    ours = fit(model, clip=0.05, plugins=[MixedPrecision("16-mixed", "cpu", mixprec.GradScaler("cpu", init_scale=2.0**10))])
    reference = Tiny(fused_torch, own_clipping=True)
    stock = fit(reference, clip=0.05, plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))])
    torch.testing.assert_close(torch.stack(model.norms), torch.stack(reference.norms), rtol=1e-5, atol=0)
    torch.testing.assert_close(ours[1], stock[1], rtol=1e-5, atol=1e-6)
    by_value = Tiny(ours_adamw, own_clipping=True)
    fit(by_value, clip=1e-3, gradient_clip_algorithm="value", plugins=[MixedPrecision("bf16-mixed", "cpu")])
    assert by_value.norms == [None] * 4


def test_true_modes_seed_masters_with_the_fp32_weights_and_apply_the_options():
    class Watch(pl.Callback):
        def on_train_start(self, trainer, module):
            opt = trainer.optimizers[0]
            self.masters = [opt.state[p]["master_param"].clone() for p in module.parameters() if p in opt.state]
            self.groups = [(g["master_weights"], g["rounding"], g["seed"]) for g in opt.param_groups]

    initial = [p.detach().clone() for p in Tiny().parameters()]
    watch = Watch()
    _, losses, params = fit(Tiny(ours_adamw), plugins=[MixprecTrainerPrecision("bf16-true")], callbacks=[watch])
    assert len(watch.masters) == len(initial)
    assert all(torch.equal(m, p) for m, p in zip(watch.masters, initial))  # exact fp32, not the bf16 rounding
    assert all(p.dtype == torch.bfloat16 for p in params) and torch.isfinite(losses).all()
    assert not any(torch.equal(p, q.bfloat16()) for p, q in zip(params, initial))  # it trained
    watch = Watch()
    trainer, _, _ = fit(Tiny(ours_adamw), callbacks=[watch], plugins=[
        MixprecTrainerPrecision("bf16-true", master_weights=False, rounding="stochastic", seed=5)])
    assert watch.masters == [] and watch.groups == [(False, "stochastic", 5)]
    assert all("master_param" not in s for s in trainer.optimizers[0].state.values())
