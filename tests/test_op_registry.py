"""Every op of the mixprec namespace, as the dispatcher lists them (not a hand-kept list), has a
CPU kernel, a CUDA kernel when the build has CUDA, a fake kernel, a version bump for each
argument it writes, and an opcheck sample (tests/op_samples.py) that passes."""
import pytest
import torch
from conftest import DEVICES
from op_samples import SAMPLES

from mixprec import ops

OPS = [name.partition("::")[2] for name in ops.op_names()]  # loads the extension


def _op(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.mixprec, name).default


def _written(name: str) -> list[int]:
    """Positions of the arguments the schema marks as written (Tensor(a!), Tensor(a!)[])."""
    return [i for i, arg in enumerate(_op(name)._schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write]


def test_the_dispatcher_lists_every_op():
    assert {"non_finite_check_and_unscale_", "update_scale_", "grad_norm", "clip_coef", "clip_grad_norm_scaled",
            "adam_step_", "sgd_step_"} <= set(OPS)


def test_every_op_has_samples():
    assert sorted(SAMPLES) == OPS, "add each new op's sample arguments to tests/op_samples.py"


@pytest.mark.parametrize("name", OPS)
def test_cpu_and_fake_kernels(name):
    qualname = f"mixprec::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta")  # where register_fake puts it
    assert torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is not None


def test_cuda_kernels_for_every_op_or_none():
    lacking = [n.partition("::")[2] for n in ops.ops_without_kernel("CUDA")]
    if torch.cuda.is_available():
        assert lacking == [], f"a GPU is present but these ops have no CUDA kernel: {lacking}"
    assert lacking in ([], OPS), f"the build has CUDA kernels, but not for {lacking}"


def _args_kwargs(sample):
    """A sample is positional arguments, or (positional, keyword-only) as op_samples.py says."""
    return sample if isinstance(sample[-1], dict) else (sample, {})


@pytest.mark.parametrize("name", OPS)
def test_written_arguments_bump_their_versions(name):
    written = _written(name)
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"mixprec::{name}", "ADInplaceOrView")
    assert has_kernel == bool(written)
    for args, kwargs in map(_args_kwargs, SAMPLES[name]("cpu")):
        schema = _op(name)._schema.arguments  # written keyword-only arguments come by name
        values = [args[i] if i < len(args) else kwargs.get(schema[i].name) for i in written]
        tensors = [t for v in values if v is not None for t in (v if isinstance(v, list) else [v])]
        before = [t._version for t in tensors]
        _op(name)(*args, **kwargs)
        assert all(t._version > v for t, v in zip(tensors, before)), f"{name}: a written tensor kept its version"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, device):
    for args, kwargs in map(_args_kwargs, SAMPLES[name](device)):
        tensors = [t for a in list(args) + list(kwargs.values()) for t in (a if isinstance(a, list) else [a])
                   if isinstance(t, torch.Tensor)]
        # opcheck's schema test compares float tensors with arithmetic that torch's CPU float8
        # kernels lack ("mul_cpu_reduced_float" for Float8_e4m3fn); fp8 samples take the others.
        utils = [u for u in ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
                 if u != "test_schema" or not any(t.dtype == torch.float8_e4m3fn for t in tensors)]
        torch.library.opcheck(_op(name), args, kwargs, test_utils=utils)
