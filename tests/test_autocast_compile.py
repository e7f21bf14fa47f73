"""mixprec.autocast entered inside a function that torch.compile traces (issue 14 item 21): with
torch's policy it traces exactly as torch.autocast does; with another policy the policy is traced
into the graph (fullgraph works) and gives eager mixprec.autocast's numbers. The CPU backends
"eager" (dynamo's graph, run as is) and "aot_eager" (AOTAutograd's traced forward and backward)
cover both ways a graph meets the policy; inductor only fuses what AOTAutograd traced."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixprec
from mixprec.autocast import _compiled, _current_state
from mixprec.policy import default_policy

BACKENDS = ["eager", "aot_eager"]
POLICY = default_policy("cpu").override({F.softmax: "fp32", torch.exp: "bf16", F.linear: "fp16"})


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    # nothing a trace did is left active on this thread
    assert _current_state("cpu") == 0 and not torch.is_autocast_enabled("cpu") and _compiled.saved == []


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.softmax(self.fc(x), dim=-1)
        return self.head(h * torch.exp(x).sum(-1, keepdim=True))


def _train_step(model, region):
    """The compiled part of a train step: a region, the loss outside it (backward runs the
    compiled backward graph; dynamo does not trace .backward() itself)."""

    def step(x, target):
        with region():
            out = model(x)
        return F.mse_loss(out.float(), target), out

    return step


def _results(region, compile_backend=None):
    """Loss, output and gradients of one step of a fresh model (same seed every time)."""
    model = _fresh_model()
    step = _train_step(model, region)
    if compile_backend is not None:
        step = torch.compile(step, backend=compile_backend, fullgraph=True)
    x, target = torch.randn(6, 8), torch.randn(6, 4)
    loss, out = step(x, target)
    loss.backward()
    return [loss, out] + [p.grad for p in model.parameters()]


def _fresh_model():
    torch.manual_seed(0)
    return Net()


def assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype, (x.dtype, y.dtype)
        assert torch.equal(x, y)


def _graphs_and_breaks(fn, *args):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    return explained.graph_count, explained.graph_break_count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_policy_traces_as_torch_autocast(backend, dtype):
    """fullgraph=True; the compiled step equals torch.autocast's compiled step bit for bit (loss,
    output dtype and values, gradients)."""
    ours = _results(lambda: mixprec.autocast("cpu", dtype=dtype), backend)
    torchs = _results(lambda: torch.autocast("cpu", dtype=dtype), backend)
    assert_identical(ours, torchs)
    assert ours[1].dtype == dtype


def test_torch_policy_equals_eager_torch_autocast():
    """backend="eager" runs dynamo's graph op by op: the same numbers as eager torch.autocast."""
    eager = _results(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert_identical(_results(lambda: mixprec.autocast("cpu", dtype=torch.bfloat16), "eager"), eager)


def test_torch_policy_graph_breaks_where_torch_autocast_does():
    """One graph without breaks; a break inside the region splits it as it splits torch's."""
    model = _fresh_model()
    x = torch.randn(6, 8)

    def plain(region):
        def fn(x):
            with region():
                return model(x)
        return fn

    def broken(region):
        def fn(x):
            with region():
                h = model.fc(x)
                torch._dynamo.graph_break()
                return model.head(h)
        return fn

    ours = lambda: mixprec.autocast("cpu", dtype=torch.bfloat16)
    torchs = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    assert _graphs_and_breaks(plain(ours), x) == _graphs_and_breaks(plain(torchs), x) == (1, 0)
    assert _graphs_and_breaks(broken(ours), x) == _graphs_and_breaks(broken(torchs), x) == (2, 1)
    compiled = torch.compile(broken(ours), backend="aot_eager")
    assert_identical([compiled(x)], [broken(torchs)(x)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_policy_is_traced_into_one_graph(backend):
    """fullgraph=True with a policy that differs from torch's, and the compiled step gives eager
    mixprec.autocast's numbers with that policy bit for bit, gradients included."""
    eager = _results(lambda: mixprec.autocast("cpu", dtype=torch.bfloat16, policy=POLICY))
    compiled = _results(lambda: mixprec.autocast("cpu", dtype=torch.bfloat16, policy=POLICY), backend)
    assert_identical(compiled, eager)
    assert eager[1].dtype == torch.float16  # head is linear: fp16 by the policy, not bf16
    torchs = _results(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert torchs[1].dtype == torch.bfloat16  # so the policy did change something


def test_custom_policy_region_makes_no_graph_break():
    model = _fresh_model()
    x = torch.randn(6, 8)

    def fn(x):
        y = x * 2  # before the region
        with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=POLICY):
            out = model(y)
        return out.float() + 1  # after it

    assert _graphs_and_breaks(fn, x) == (1, 0)


def test_custom_policy_region_with_a_break_inside_runs_its_frame_eagerly():
    """Dynamo cannot resume inside the region: the frame runs eagerly (same numbers), and the
    policy the abandoned trace had switched on is switched off again (checked by the fixture)."""
    model = _fresh_model()
    x = torch.randn(6, 8)

    def fn(x):
        with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=POLICY):
            h = model.fc(x)
            torch._dynamo.graph_break()
            return model.head(h)

    compiled = torch.compile(fn, backend="aot_eager")
    for _ in range(2):
        assert_identical([compiled(x)], [fn(x)])
        assert _current_state("cpu") == 0 and not torch.is_autocast_enabled("cpu")
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        torch.compile(fn, backend="eager", fullgraph=True)(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_policy_region_inside_an_eager_policy_region_switches_it_off(backend):
    """As in eager: a region with torch's policy inside one with another policy runs torch's."""
    model = _fresh_model()
    x = torch.randn(6, 8)

    def fn(x):
        with mixprec.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    with torch.no_grad(), mixprec.autocast("cpu", dtype=torch.bfloat16, policy=POLICY):
        eager = fn(x)
        compiled = torch.compile(fn, backend=backend, fullgraph=True)(x)
    assert eager.dtype == torch.bfloat16
    assert_identical([compiled], [eager])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decorated_function_is_traced(backend):
    @mixprec.autocast("cpu", dtype=torch.bfloat16, policy=POLICY)
    def forward(model, x):
        return model(x)

    model = _fresh_model()
    x = torch.randn(6, 8)
    compiled = torch.compile(lambda x: forward(model, x), backend=backend, fullgraph=True)
    assert_identical([compiled(x)], [forward(model, x)])


@pytest.mark.parametrize("policy, error", [
    (default_policy("cuda"), "ValueError: policy is for 'cuda' but the region is 'cpu'"),
    ("fp16", "TypeError: policy must be a mixprec.Policy, got str"),
])
def test_bad_arguments_raise_in_a_trace_as_in_eager(policy, error):
    def fn(x):
        with mixprec.autocast("cpu", policy=policy):
            return x + 1

    # dynamo reports an exception raised while it traces as its own RuntimeError, naming ours
    with pytest.raises(RuntimeError, match=error):
        torch.compile(fn, backend="eager", fullgraph=True)(torch.randn(2))


def test_another_policy_object_retraces():
    """The graph is guarded on the policy object: switching the region's policy between calls
    switches what the compiled function runs (torch 2.11 and 2.14 guard it the same way)."""
    model = _fresh_model()
    x = torch.randn(6, 8)
    policies = {"now": POLICY}

    def fn(x):
        with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policies["now"]):
            return model(x)

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    with torch.no_grad():
        for policy, dtype in [(POLICY, torch.float16), (default_policy("cpu"), torch.bfloat16),
                              (POLICY, torch.float16)]:
            policies["now"] = policy
            out = compiled(x)
            assert out.dtype == dtype
            assert_identical([out], [fn(x)])


def test_record_region_runs_its_frame_eagerly_and_records():
    model = _fresh_model()
    x = torch.randn(6, 8)
    seen = {}

    def fn(x):
        with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=POLICY, record=True) as region:
            out = model(x)
        seen["ops"] = region.records["ops"]
        return out

    out = torch.compile(fn, backend="aot_eager")(x)
    assert out.dtype == torch.float16 and seen["ops"][("addmm", "float16")] == 2  # fc and head


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("region_policy", ["torch", "custom"])
@pytest.mark.parametrize("region_outside", [False, True])
def test_per_module_policy_is_traced_without_a_graph_break(backend, region_policy, region_outside):
    """set_policy on a submodule inside a compiled model (issue 16's bf16 head beside fp8
    linears): fullgraph=True whether the region is entered inside the compiled function or around
    it, and the compiled step equals the eager step bit for bit, gradients included."""
    policy = None if region_policy == "torch" else POLICY
    head_policy = default_policy("cpu").override({F.linear: "fp16"})
    region = lambda: mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy)

    def results(compile_backend):
        model = _fresh_model()
        mixprec.set_policy(model.head, head_policy)
        x, target = torch.randn(6, 8), torch.randn(6, 4)
        if region_outside:
            fwd = torch.compile(model, backend=compile_backend, fullgraph=True) if compile_backend else model
            with region():
                out = fwd(x)
        else:
            step = _train_step(model, region)
            step = torch.compile(step, backend=compile_backend, fullgraph=True) if compile_backend else step
            out = step(x, target)[1]
        F.mse_loss(out.float(), target).backward()
        return [out] + [p.grad for p in model.parameters()]

    eager = results(None)
    assert eager[0].dtype == torch.float16  # the head's policy decided the output
    compiled = results(backend)
    # A region around the compiled model is still active when AOTAutograd traces the backward, so
    # the backward's matmuls take the region's casts there, not eager's (none: eager's backward
    # runs outside the region). torch.autocast does the same to an autocast(enabled=False) island
    # in a compiled model, so only the forward is compared then.
    assert_identical(compiled[:1] if region_outside and backend == "aot_eager" else compiled,
                     eager[:1] if region_outside and backend == "aot_eager" else eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_model_recompiles_for_a_region_of_another_policy(backend):
    """One compiled model called inside regions of two policies (the regions around it, as in a
    training loop): each call gives that policy's eager result, not the graph of the other."""
    model = _fresh_model()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(6, 8)
    with torch.no_grad():
        for policy in (None, POLICY, None, POLICY):
            with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy):
                out, eager = compiled(x), model(x)
            assert out.dtype == (torch.float16 if policy is POLICY else torch.bfloat16)
            assert_identical([out], [eager])
