"""mixprec.models: the built-in models run a forward in the dtype they are cast to, the GPT is
causal and has GPT-2's parameter layout, and the synthetic data is what it says."""
from __future__ import annotations

import math

import pytest
import torch

from mixprec.models import CNN, GPT, MLP, MarkovText, TeacherData

DTYPES = [torch.float32, torch.bfloat16]


def _small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab=48, ctx=16, layers=2, d=32, heads=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_model_runs_a_forward_in_its_dtype(dtype):
    torch.manual_seed(0)
    cases = [(_small_gpt(), torch.randint(48, (3, 16)), (3, 16, 48)),
             (MLP(dim=12, hidden=20, classes=5, depth=3), torch.randn(7, 12), (7, 5)),
             (CNN(classes=6, widths=(4, 8)), torch.randn(2, 3, 16, 16), (2, 6))]
    for model, x, shape in cases:
        model = model.to(dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        out = model(x if x.dtype == torch.long else x.to(dtype))
        assert out.shape == shape and out.dtype == dtype and bool(out.isfinite().all())


def test_gpt_has_gpt2_tensors_plus_an_untied_head():
    """The same tensor sizes as the GPT-2 lists the benchmarks time, and a head of its own."""
    from benchmarks.harness import gpt2_shapes  # the repository root is on sys.path under pytest

    model = _small_gpt()
    sizes = [p.numel() for p in model.parameters()]
    assert sorted(sizes[:-1]) == sorted(math.prod(s) for s in gpt2_shapes(2, 32, vocab=48, ctx=16))
    assert model.head.weight.shape == (48, 32) and model.head.bias is None
    assert model.head.weight.data_ptr() != model.wte.weight.data_ptr()


def test_gpt_initialisation():
    model = _small_gpt()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.dim() == 2:
            std = 0.02 / math.sqrt(2 * 2) if name.endswith("proj.weight") else 0.02
            assert p.std().item() == pytest.approx(std, rel=0.3), name


def test_gpt_is_causal():
    model = _small_gpt().eval()
    idx = torch.randint(48, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 48
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_markov_text_batches_and_entropy_floor():
    data = MarkovText(vocab=16, branching=3, seed=4)
    first = data.batch(5, 40)
    assert torch.equal(first[0], MarkovText(vocab=16, branching=3, seed=4).batch(5, 40)[0])
    x, y = data.batch(5, 40)
    assert x.shape == y.shape == (5, 40) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one token
    assert torch.allclose(data.probs.sum(dim=1), torch.ones(16))
    assert (data.probs > 0.01).sum(dim=1).max() <= 3  # `branching` likely successors per token
    h = data.entropy()
    assert 0 < h < math.log(3) + 0.05
    # the floor is the cross-entropy of the chain's own probabilities on its own tokens
    x, y = MarkovText(vocab=16, branching=3, seed=4).batch(400, 200)
    observed = -data.probs[x, y].log().mean().item()
    assert observed == pytest.approx(h, rel=0.05)


def test_teacher_data_labels_come_from_the_teacher():
    data = TeacherData((3, 4, 4), classes=7, seed=2)
    x, y = data.batch(32)
    assert x.shape == (32, 3, 4, 4) and y.shape == (32,)
    assert torch.equal(y, (x.flatten(1) @ data.teacher).argmax(dim=1))
    assert 0 <= int(y.min()) and int(y.max()) < 7
    other = TeacherData((3, 4, 4), classes=7, seed=2)
    assert torch.equal(other.batch(32)[0], x)
