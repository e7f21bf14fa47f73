"""mixprec.autocast against torch.autocast: the default table, rules, per-module policies, caches,
autograd, custom_fwd/bwd, threads, torch.compile and errors. The OpInfo-wide conformance sweep is
in test_autocast_conformance.py."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec
from mixprec.autocast import _current_state
from mixprec.policy import default_policy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW = [torch.float16, torch.bfloat16]


def assert_identical(a, b):
    flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype, (x.dtype, y.dtype)
            assert torch.equal(x, y) or torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True) is None
        else:
            assert x == y


# ---- the default policy in a region ---------------------------------------------------------
def test_default_policy_activates_nothing():
    """torch's table needs no mixprec kernel: the region is torch.autocast plus one C call."""
    assert default_policy("cpu").state() == 0
    with mixprec.autocast("cpu", dtype=torch.bfloat16):
        assert _current_state("cpu") == 0
        assert not torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.AutocastPrivateUse1)


def test_import_changes_nothing_in_torch_and_prints_nothing():
    script = r"""
import torch
def snapshot():
    ops = set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCPU"))
    ops |= set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA"))
    return ({op: torch._C._dispatch_dump(op) for op in sorted(ops)},
            str(torch._C._dispatch_tls_local_include_set()), str(torch._C._dispatch_tls_local_exclude_set()))
before = snapshot()
import mixprec
from mixprec.policy import default_policy
default_policy("cpu"); default_policy("cuda")
with mixprec.autocast("cpu", dtype=torch.bfloat16):
    torch.mm(torch.randn(2, 2), torch.randn(2, 2))
assert snapshot() == before, "importing/using mixprec changed torch's autocast"
"""
    result = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


# ---- same results as torch.autocast -------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.norm(F.gelu(self.fc(x)))
        att = torch.softmax(h @ h.transpose(-1, -2), dim=-1)
        return self.head(att @ h).sum(dim=0).cumsum(0)


def _grads_under(region, seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = Tiny().to(device)
    x = torch.randn(6, 16, device=device)
    with region():
        out = model(x)
    out.float().sum().backward()
    return out, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("handle_all", [False, True])
def test_forward_and_gradients_equal_torch(device, dtype, handle_all):
    """handle_all routes every op of torch's table through mixprec's C++ kernel, which must
    reproduce torch's rules bit for bit, gradients included."""
    policy = default_policy(device)
    ours = mixprec.autocast(device, dtype=dtype)
    ours._state = policy.state(handle_all=True) if handle_all else 0
    reference = _grads_under(lambda: torch.autocast(device, dtype=dtype), device=device)
    result = _grads_under(lambda: ours, device=device)
    assert_identical(result, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_cast_cache_is_torchs_one_cast_per_weight_per_region(device):
    """A weight used twice in a region is cast once; the cache is cleared on the outermost exit."""
    w = torch.randn(8, 8, device=device, requires_grad=True)
    x = torch.randn(8, 8, device=device)
    policy = default_policy(device).override({torch.mm: "fp16"})  # our kernel, through our cache
    region = mixprec.autocast(device, dtype=torch.float16, policy=policy, record=True)
    with torch.no_grad(), region:
        a, b = torch.mm(x, w), torch.mm(x, w)
    assert torch.equal(a, b) and a.dtype == torch.float16
    casts = region.records["casts"]
    assert casts[("mm", "float32", "float16")] == 3  # x twice (not a leaf param), w once
    with torch.no_grad(), mixprec.autocast(device, dtype=torch.float16, policy=policy, record=True) as again:
        torch.mm(x, w)
    assert again.records["casts"][("mm", "float32", "float16")] == 2  # cleared at exit: w cast again


# ---- rules ------------------------------------------------------------------------------------
class _PromoteError(Exception):
    pass


_REFERENCE_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _reference(fn, rule, region_dtype, tensors):
    """The rule written out by hand: cast eligible inputs, run with autocast off."""
    floats = [t for t in tensors if t.dtype != torch.float64]
    if rule == "lower":
        to = region_dtype
    elif rule == "promote":  # torch's prioritize, folded left from the region dtype
        to = region_dtype
        for t in floats:
            if to == torch.float32 or t.dtype == torch.float32:
                to = torch.float32
            elif t.dtype != region_dtype:
                raise _PromoteError  # torch: "Unexpected floating ScalarType"
    elif rule == "keep":
        to = None
    else:
        to = _REFERENCE_DTYPE[rule]
    cast = [t.to(to) if to is not None and t.dtype != torch.float64 else t for t in tensors]
    with torch.autocast("cpu", enabled=False):
        return fn(*cast)


_OPS = {
    "mm": (torch.mm, lambda d: [torch.randn(4, 5, dtype=d[0]), torch.randn(5, 3, dtype=d[1])]),
    "add": (torch.add, lambda d: [torch.randn(4, 3, dtype=d[0]), torch.randn(4, 3, dtype=d[1])]),
    "cat": (lambda a, b: torch.cat([a, b]), lambda d: [torch.randn(2, 3, dtype=d[0]), torch.randn(2, 3, dtype=d[1])]),
    "exp": (torch.exp, lambda d: [torch.randn(4, 3, dtype=d[0])]),
}
_OP_OF = {"mm": torch.mm, "add": torch.add, "cat": torch.cat, "exp": torch.exp}


@given(
    op=st.sampled_from(sorted(_OPS)),
    rule=st.sampled_from(["lower", "fp16", "bf16", "fp32", "keep", "promote"]),
    region_dtype=st.sampled_from(LOW),
    dtypes=st.tuples(*[st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])] * 2),
    seed=st.integers(0, 2**16),
)
@settings(deadline=None)
def test_every_rule_matches_its_hand_written_reference(op, rule, region_dtype, dtypes, seed):
    fn, make = _OPS[op]
    torch.manual_seed(seed)
    tensors = make(dtypes)
    policy = default_policy("cpu").override({_OP_OF[op]: rule})
    try:
        expected = _reference(fn, rule, region_dtype, tensors)
    except (RuntimeError, _PromoteError) as err:  # e.g. mm of mixed dtypes under "keep"
        match = "Unexpected floating ScalarType" if isinstance(err, _PromoteError) else None
        with pytest.raises(RuntimeError, match=match), mixprec.autocast("cpu", dtype=region_dtype, policy=policy):
            fn(*tensors)
        return
    with mixprec.autocast("cpu", dtype=region_dtype, policy=policy):
        result = fn(*tensors)
    assert_identical(result, expected)


def test_overrides_change_exactly_the_ops_named():
    """The ops the policy names run by their new rule; every other op gives torch's result (which
    overloads an override reaches is tested in test_policy.py)."""
    policy = default_policy("cpu").override({F.softmax: "lower", torch.cumsum: "fp32", "aten::mm": "keep"})
    torch.manual_seed(0)
    x, w = torch.randn(6, 6), torch.randn(6, 6, requires_grad=True)
    with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy):
        ours = (torch.softmax(x, -1), torch.cumsum(x.bfloat16(), 0), torch.mm(x, w), F.linear(x, w), torch.exp(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = (torch.softmax(x, -1), torch.cumsum(x.bfloat16(), 0), torch.mm(x, w), F.linear(x, w), torch.exp(x))
    assert ours[0].dtype == torch.bfloat16 and theirs[0].dtype == torch.float32  # not in torch's CPU table
    assert ours[1].dtype == torch.float32 and theirs[1].dtype == torch.bfloat16
    assert ours[2].dtype == torch.float32 and theirs[2].dtype == torch.bfloat16
    assert_identical(ours[3:], theirs[3:])  # untouched ops: torch's result


def test_fp32_set_opt_dtype_and_append_dtype_rules_reproduce_torch():
    policy = default_policy("cpu").override({torch.sum: "fp32_set_opt_dtype", "aten::norm.Scalar": "fp32_append_dtype"})
    x = torch.randn(5, 5)
    with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy):
        s, n = torch.sum(x.bfloat16()), torch.ops.aten.norm.Scalar(x.bfloat16(), 2)
    assert s.dtype == torch.float32 and torch.equal(s, torch.sum(x.bfloat16(), dtype=torch.float32))
    assert n.dtype == torch.float32 and torch.equal(n, torch.ops.aten.norm.ScalarOpt_dtype(x.bfloat16(), 2, dtype=torch.float32))


# ---- regions, nesting, threads -----------------------------------------------------------------
def test_nested_disabled_region_and_restore():
    policy = default_policy("cpu").override({torch.exp: "bf16"})
    x = torch.randn(4)
    with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy):
        assert torch.exp(x).dtype == torch.bfloat16
        with mixprec.autocast("cpu", enabled=False):
            assert torch.exp(x).dtype == torch.float32
        with mixprec.autocast("cpu", dtype=torch.bfloat16):  # default policy inside
            assert torch.exp(x).dtype == torch.float32
        assert torch.exp(x).dtype == torch.bfloat16
    assert torch.exp(x).dtype == torch.float32 and _current_state("cpu") == 0


def test_policy_is_thread_local():
    policy = default_policy("cpu").override({torch.exp: "bf16"})
    seen = {}

    def other_thread():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seen["dtype"] = torch.exp(torch.randn(3)).dtype

    with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert torch.exp(torch.randn(3)).dtype == torch.bfloat16
    assert seen["dtype"] == torch.float32


def test_decorator_form():
    policy = default_policy("cpu").override({torch.exp: "bf16"})

    @mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy)
    def f(x):
        return torch.exp(x)

    assert f(torch.randn(3)).dtype == torch.bfloat16 and _current_state("cpu") == 0


# ---- per-module policies ----------------------------------------------------------------------
def test_set_policy_holds_for_the_module_inside_nested_regions():
    model = Tiny()
    mixprec.set_policy(model.head, default_policy("cpu").override({torch.nn.functional.linear: "fp32"}))
    x = torch.randn(6, 16)
    with mixprec.autocast("cpu", dtype=torch.bfloat16, record=True) as region, \
            mixprec.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert model.fc(x).dtype == torch.float32  # outside any region: no autocast
    ops = region.records["ops"]
    assert ops[("addmm", "bfloat16")] == 1 and ops[("addmm", "float32")] == 1  # fc bf16, head fp32
    assert out.dtype == torch.float32
    mixprec.set_policy(model.head, None)
    with mixprec.autocast("cpu", dtype=torch.bfloat16, record=True) as region:
        model(x)
    assert region.records["ops"][("addmm", "bfloat16")] == 2


def test_keep_fp32_runs_the_subtree_in_fp32_and_gradients_flow():
    torch.manual_seed(0)
    model = Tiny()
    mixprec.keep_fp32(model.head)
    x = torch.randn(6, 16)
    with mixprec.autocast("cpu", dtype=torch.bfloat16, record=True) as region:
        out = model(x)
    assert out.dtype == torch.float32
    assert region.records["ops"][("addmm", "float32")] == 1
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # the same as running head by hand in fp32
    torch.manual_seed(0)
    ref = Tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = ref.norm(F.gelu(ref.fc(x)))
        att = torch.softmax(h @ h.transpose(-1, -2), dim=-1)
        inner = att @ h
        with torch.autocast("cpu", enabled=False):
            expected = ref.head(inner.float()).sum(dim=0).cumsum(0)
    assert torch.equal(out, expected)


def _run_in_two_threads(first, second, module, iterations):
    """Call first() and second() in two threads `iterations` times, so that both threads are inside
    `module` at once every time: a barrier before each call, and one inside the module, after its
    mixprec pre-hook has run in both threads. Returns their results, call by call."""
    start, inside = threading.Barrier(2, timeout=10), threading.Barrier(2, timeout=10)

    def meet(mod, args):
        inside.wait()

    handle = module.register_forward_pre_hook(meet)
    results: dict[str, list] = {"first": [], "second": []}
    errors: list[BaseException] = []

    def loop(name, fn):
        try:
            for _ in range(iterations):
                start.wait()
                results[name].append(fn())
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
            start.abort()
            inside.abort()

    threads = [threading.Thread(target=loop, args=("first", first)),
               threading.Thread(target=loop, args=("second", second))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        handle.remove()
    assert not errors, errors
    return results["first"], results["second"]


def test_set_policy_on_a_module_shared_by_two_threads():
    """Thread A runs the model in a region (the head under its own policy), thread B runs the same
    model with no autocast at the same time: each gets exactly its single-threaded result, and
    neither thread is left with a policy active."""
    torch.manual_seed(0)
    model = Tiny()
    mixprec.set_policy(model.head, default_policy("cpu").override({F.linear: "fp16"}))
    x = torch.randn(6, 16)

    def in_region():
        with torch.no_grad(), mixprec.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            inside = _current_state("cpu")  # the region's (torch's) policy again after the head
        return out, inside, _current_state("cpu"), torch.is_autocast_enabled("cpu")

    def plain():
        with torch.no_grad():
            out = model(x)
        return out, _current_state("cpu"), _current_state("cpu"), torch.is_autocast_enabled("cpu")

    alone_a, alone_b = in_region(), plain()
    assert alone_a[0].dtype == torch.float16 and alone_b[0].dtype == torch.float32
    seen_a, seen_b = _run_in_two_threads(in_region, plain, model.head, 300)
    for got in seen_a:
        assert_identical(got, alone_a)
    for got in seen_b:
        assert_identical(got, alone_b)


def test_keep_fp32_on_a_module_shared_by_two_threads():
    """keep_fp32 turns autocast off inside the module in the thread that runs it only: the other
    thread's region keeps its own autocast state, before, inside and after the module."""
    torch.manual_seed(0)
    model = Tiny()
    mixprec.keep_fp32(model.head)
    x = torch.randn(6, 16)

    def in_region():
        with torch.no_grad(), mixprec.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            after = torch.mm(x, x.t()).dtype  # autocast is back on after the module
        return out, after, torch.is_autocast_enabled("cpu")

    def plain():
        with torch.no_grad():
            out = model(x)
        return out, torch.mm(x, x.t()).dtype, torch.is_autocast_enabled("cpu")

    alone_a, alone_b = in_region(), plain()
    assert alone_a[1] == torch.bfloat16 and not alone_a[2]
    assert alone_b == (alone_b[0], torch.float32, False)
    seen_a, seen_b = _run_in_two_threads(in_region, plain, model.head, 300)
    for got in seen_a:
        assert_identical(got, alone_a)
    for got in seen_b:
        assert_identical(got, alone_b)


def test_report_names_ops_dtypes_and_casts():
    with mixprec.autocast("cpu", dtype=torch.bfloat16, record=True) as region:
        Tiny()(torch.randn(6, 16))
    text = region.report()
    assert "addmm" in text and "bfloat16" in text and "float32 -> bfloat16" in text
    with pytest.raises(RuntimeError, match="record=True"):
        mixprec.autocast("cpu").report()


def test_record_names_the_overridden_op_for_its_casts():
    """linear runs as t + addmm below autocast; the casts its rule made are reported on linear,
    the key the policy has, not on t."""
    policy = default_policy("cpu").override({F.linear: "fp16"})
    model = torch.nn.Linear(4, 3)
    with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy, record=True) as region:
        out = model(torch.randn(2, 4))
    assert out.dtype == torch.float16
    casts, ops = region.records["casts"], region.records["ops"]
    assert casts == {("linear", "float32", "float16"): 3}  # input, weight, bias
    assert ops[("t", "float16")] == 1 and ops[("addmm", "float16")] == 1
    assert "linear               float32 -> float16" in region.report()


# ---- custom_fwd / custom_bwd -------------------------------------------------------------------
class _Square(torch.autograd.Function):
    @staticmethod
    @mixprec.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x):
        ctx.save_for_backward(x)
        assert not torch.is_autocast_enabled("cpu")
        return x * x

    @staticmethod
    @mixprec.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ctx.bwd_policy_state = _current_state("cpu")
        return 2 * x * grad


def test_custom_fwd_casts_inputs_and_custom_bwd_restores_the_policy():
    policy = default_policy("cpu").override({torch.exp: "bf16"})
    x = torch.randn(4, dtype=torch.bfloat16, requires_grad=True)
    with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy):
        y = _Square.apply(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert torch.equal(x.grad, (2 * x.float()).bfloat16())


# ---- persistent weight cache ------------------------------------------------------------------
def test_weight_cache_skips_recasts_until_the_weight_changes():
    mixprec.clear_weight_cache()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with torch.no_grad():
        with mixprec.autocast("cpu", dtype=torch.bfloat16, weight_cache=True, record=True) as first:
            a = model(x)
        with mixprec.autocast("cpu", dtype=torch.bfloat16, weight_cache=True, record=True) as second:
            b = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(x)
    assert torch.equal(a, expected) and torch.equal(b, expected)
    assert sum(first.records["casts"].values()) == 3  # x, weight, bias
    assert sum(second.records["casts"].values()) == 1  # x only
    assert mixprec.weight_cache_info() == {"entries": 2, "bytes": (64 + 8) * 2}
    opt = mixprec.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()
    opt.step()  # in-place write: bumps the version counter
    with torch.no_grad(), mixprec.autocast("cpu", dtype=torch.bfloat16, weight_cache=True, record=True) as third:
        c = model(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(c, model(x))
    assert sum(third.records["casts"].values()) == 3
    del model, opt
    assert mixprec.weight_cache_info()["entries"] == 0  # freed weights expire
    mixprec.clear_weight_cache()


def test_weight_cache_is_not_used_with_grad_mode_on():
    mixprec.clear_weight_cache()
    model = torch.nn.Linear(4, 4)
    with mixprec.autocast("cpu", dtype=torch.bfloat16, weight_cache=True):
        model(torch.randn(2, 4)).float().sum().backward()
    assert model.weight.grad is not None
    assert mixprec.weight_cache_info()["entries"] == 0


# ---- torch.compile ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_under_mixprec_autocast_equals_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tiny().to(device)
    x = torch.randn(6, 16, device=device)
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for policy in (default_policy(device), default_policy(device).override({F.softmax: "lower"})):
        with torch.no_grad(), mixprec.autocast(device, dtype=torch.bfloat16, policy=policy):
            eager = model(x)
            traced = compiled(x)
        assert traced.dtype == eager.dtype
        if backend == "aot_eager":
            assert torch.equal(traced, eager)
        else:  # inductor fuses: same maths, different rounding order
            torch.testing.assert_close(traced, eager, rtol=2e-2, atol=2e-2)
        torch._dynamo.reset()


# ---- errors -------------------------------------------------------------------------------------
def test_bad_regions_fail_at_construction():
    """Bad policies fail when they are built: test_policy.py."""
    with pytest.raises(ValueError, match="device types"):
        mixprec.autocast("mps")
    with pytest.raises(ValueError, match="policy is for 'cpu'"):
        mixprec.autocast("cuda", policy=default_policy("cpu"))
    with pytest.raises(TypeError, match="mixprec.Policy"):
        mixprec.autocast("cpu", policy={"aten::mm": "fp32"})
    with pytest.raises(TypeError, match="nn.Module"):
        mixprec.keep_fp32(torch.mm)


def _raised(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the exception is what we compare
        return type(err), str(err)
    return None


@pytest.mark.parametrize("device_type", [torch.device("cpu"), 3, None, "nope", "", "cuda:x", "meta"])
def test_device_types_torch_rejects_raise_what_torch_raises(device_type):
    expected = _raised(lambda: torch.autocast(device_type))
    assert expected is not None
    assert _raised(lambda: mixprec.autocast(device_type)) == expected


def test_decorating_a_non_callable_raises_type_error_as_torch():
    # torch 2.14 raises this TypeError; 2.11 (the GPU machine's) returns a wrapper that fails only
    # when called. We raise on every version.
    with pytest.raises(TypeError, match=r"requires a callable, but got Tensor.*context manager"):
        mixprec.autocast("cpu")(torch.randn(2))
    try:
        torch.autocast("cpu")(torch.randn(2))
    except TypeError as err:
        assert "requires a callable" in str(err)
