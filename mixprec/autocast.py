"""mixprec.autocast: torch.autocast's semantics, driven by an editable op-policy table.

How it runs, and why: a region enters torch.autocast exactly as torch does (same thread-local
enabled/dtype/cache/nesting state, same cast cache), then makes one C call that activates the
region's compiled policy for this thread. With torch's default policy that call activates
nothing, so every op runs through torch's own autocast kernels: identical results and speed.
With a policy that changes some ops, those ops (and only those) meet mixprec's C++ kernel at the
AutocastPrivateUse1 dispatch key, which applies their rule and calls torch's kernels below it
(csrc/autocast/). No Python runs per op: measurements made before this design put a
TorchFunctionMode that only passes calls through at +24 % on a launch-bound forward and a Python
kernel at the autocast key at ~25 µs a call. benchmarks/bench_autocast.py measures this one on an
H100: torch's policy 1.01-1.09x torch.autocast on a tiny GPT forward, every table op through the
C++ kernel 0.99-1.02x, a GPT-2 124M train step 1.00x.

Beyond torch:
- per-module policies (`set_policy`, `keep_fp32`), applied by forward pre/post hooks;
- `record=True`: which dtype each op ran in and where casts happened (`report()`);
- `weight_cache=True`: a persistent cast cache. torch.autocast re-casts every fp32 weight on
  every region entry; with the cache, a weight's low-precision copy is kept across regions, keyed
  on the weight and its version counter, so an optimizer step or any in-place write invalidates
  it. Memory: one copy of every cached weight in the region's dtype (2 bytes per parameter for
  fp16/bf16) until `clear_weight_cache()` or until the weight is freed. Only casts made with grad
  mode off are cached (inference; in training the weights change every step anyway, and a copy
  made under autograd would keep the weight alive). Writes through `.data` bypass the version
  counter and are not seen.
- torch.compile: a compiled function called inside a region traces the active policy into its
  graph (default policy: exactly torch.autocast). It is not re-traced when only the policy
  changes; compile again after changing it. A region entered *inside* a compiled function is
  traced too (see "torch.compile" below).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixprec import _extension
from mixprec.policy import DEVICE_TYPES, Policy, default_policy

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _swap(device_type: str, state: int) -> int:
    """Activate C++ table `state` (a Policy.state() id; 0: none) for `device_type` on this
    thread; returns the id active before."""
    return _extension.load().autocast_swap(device_type, state)


def _current_state(device_type: str) -> int:
    return _extension.load().autocast_active(device_type)[0]


def _check_device_type(device_type: Any, **torch_args: Any) -> None:
    """What torch.autocast raises for what it rejects (a non-str, a string naming no device or
    one without autocast), then ours for devices torch supports but mixprec does not."""
    if isinstance(device_type, str) and device_type in DEVICE_TYPES:
        return
    with warnings.catch_warnings():  # only its exception matters here
        warnings.simplefilter("ignore")
        torch.amp.autocast(device_type, **torch_args)
    raise ValueError(f"mixprec.autocast supports device types {DEVICE_TYPES}, got {device_type!r}")


class autocast:  # torch's name
    """Context manager and decorator with torch.autocast's signature and semantics, plus
    `policy` (a Policy for this device type; default: torch's), `weight_cache` and `record`
    (see the module docstring)."""

    def __new__(
        cls,
        device_type: str,
        dtype: torch.dtype | None = None,
        enabled: bool = True,
        cache_enabled: bool | None = None,
        *,
        policy: Policy | None = None,
        weight_cache: bool = False,
        record: bool = False,
    ) -> Any:
        if torch.compiler.is_compiling() and not record:  # dynamo is tracing this call
            return _traced_region(device_type, dtype, enabled, cache_enabled, policy)
        return super().__new__(cls)

    def __init__(
        self,
        device_type: str,
        dtype: torch.dtype | None = None,
        enabled: bool = True,
        cache_enabled: bool | None = None,
        *,
        policy: Policy | None = None,
        weight_cache: bool = False,
        record: bool = False,
    ) -> None:
        _check_device_type(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        if policy is None:
            policy = default_policy(device_type)
        elif not isinstance(policy, Policy):
            raise TypeError(f"policy must be a mixprec.Policy, got {type(policy).__name__}")
        elif policy.device_type != device_type:
            raise ValueError(f"policy is for {policy.device_type!r} but the region is {device_type!r}")
        self._torch = torch.amp.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        self._args = (device_type, dtype, enabled, cache_enabled)
        self.device_type = device_type
        self.fast_dtype = self._torch.fast_dtype
        self.policy = policy
        self.weight_cache = bool(weight_cache)
        # torch.amp.autocast may turn itself off (e.g. an unsupported dtype, with a warning)
        self._state = policy.state(weight_cache=self.weight_cache) if self._torch._enabled else 0
        self._record = _Recorder() if record else None
        self._saved: list[int] = []

    def __enter__(self) -> autocast:  # noqa: PYI034 - typing.Self needs Python 3.11
        self._torch.__enter__()
        self._saved.append(_swap(self.device_type, self._state))
        if self._record is not None:
            self._record.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._record is not None:
            self._record.__exit__(*exc)
        _swap(self.device_type, self._saved.pop())
        self._torch.__exit__(*exc)

    def __call__(self, fn: Callable) -> Callable:
        if not callable(fn):  # torch.autocast's error
            raise TypeError(
                f"mixprec.autocast()(func) requires a callable, but got {type(fn).__name__}. Did you "
                "mean to use autocast as a context manager? For example:\n"
                "    with mixprec.autocast(device_type=...):\n        output = model(input)"
            )

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            region = self
            if torch.compiler.is_compiling() and self._record is None:  # one made in the trace is traced
                region = autocast(*self._args, policy=self.policy)
            with region:
                return fn(*args, **kwargs)

        return wrapped

    def report(self) -> str:
        """With record=True: op → dtype it ran in → count, and the casts made before each op."""
        if self._record is None:
            raise RuntimeError("report() needs mixprec.autocast(..., record=True)")
        return self._record.report()

    @property
    def records(self) -> dict[str, Counter]:
        """With record=True: {"ops": Counter((op, dtype)), "casts": Counter((op, from, to)), "fp8":
        [one entry per fp8 linear: shape, and per operand amax, scale, saturated and flushed counts
        as device tensors]}."""
        if self._record is None:
            raise RuntimeError("records needs mixprec.autocast(..., record=True)")
        return {"ops": self._record.ops, "casts": self._record.casts, "fp8": self._record.fp8}


class _Recorder(TorchDispatchMode):
    """Sees every op below autocast (so after its casts): the dtype each op ran in, and the casts
    (aten._to_copy to another float dtype). A cast made by mixprec's kernel is attributed to the
    op the policy names (``linear``, not the ``t`` that linear decomposes into first); any other
    cast to the op that follows it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.casts: Counter = Counter()
        self.fp8: list[dict[str, Any]] = []  # the fp8 rule's linears (mixprec.fp8's audit)
        self._pending: list[tuple[str | None, str, str]] = []
        self._previous_fp8: list[dict[str, Any]] | None = None

    def __enter__(self):
        from mixprec import fp8

        self._previous_fp8 = fp8.record_into(self.fp8)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        from mixprec import fp8

        fp8.record_into(self._previous_fp8)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor) and \
                isinstance(out, torch.Tensor) and out.dtype != args[0].dtype and \
                args[0].dtype in _FLOAT_DTYPES and out.dtype in _FLOAT_DTYPES:
            handled = _extension.load().autocast_casting_op()  # "aten::linear", or None
            handled = handled.removeprefix("aten::") if handled else None
            self._pending.append((handled, _dtype_name(args[0].dtype), _dtype_name(out.dtype)))
            return out
        first = next((t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)), None)
        self.ops[(name, _dtype_name(first.dtype) if first is not None else "-")] += 1
        for handled, source, target in self._pending:
            self.casts[(handled or name, source, target)] += 1
        self._pending.clear()
        return out

    def report(self) -> str:
        lines = ["op                                  dtype      count"]
        lines += [f"{op:<35} {dtype:<10} {n:>5}" for (op, dtype), n in sorted(self.ops.items())]
        lines += ["", "casts (before op: from -> to)        count"]
        lines += [f"{op:<20} {a} -> {b:<12} {n:>5}" for (op, a, b), n in sorted(self.casts.items())]
        if self.fp8:
            from mixprec import fp8

            lines += ["", fp8.audit_report(self.fp8)]
        return "\n".join(lines)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- torch.compile ----------------------------------------------------------------------------
# A region entered inside a function that dynamo traces becomes, in the trace:
# - with torch's policy (and no outer mixprec policy to switch off): torch.amp.autocast itself, so
#   it traces exactly as torch.autocast does (fullgraph, graph breaks inside the region, guards);
# - with another policy: torch.amp.autocast, and inside it two graph nodes that activate and
#   restore the policy's C++ table (a generator context manager: torch 2.11's dynamo traces
#   neither torch's _enter_autocast nor autocast.__enter__ called from our own __enter__).
#   Dynamo and AOTAutograd run those nodes while they trace, so the policy's casts are traced
#   into the graph as explicit ops (backend="eager" runs them at every call instead). The whole
#   region is one graph (fullgraph works); a graph break inside it makes
#   dynamo run the whole frame eagerly, with the policy (dynamo cannot resume inside a context
#   manager it does not know).
# weight_cache has no effect in a trace (compiled graphs make their casts anyway); record=True
# regions are not traced (dynamo runs their frame eagerly, so that every op is recorded).
class _CompiledStack(threading.local):
    def __init__(self) -> None:
        self.saved: list[tuple[str, int]] = []


_compiled = _CompiledStack()
_dynamo_ready = False  # see _dynamo_setup


def _traced_region(device_type, dtype, enabled, cache_enabled, policy):
    # A Policy reaches _table_for_trace as its id: torch 2.11's dynamo passes only constants to
    # such a function (2.14 passes objects as well); id() guards the graph on this very policy.
    policy_id = id(policy) if isinstance(policy, Policy) else None
    state = _table_for_trace(device_type, dtype, enabled, cache_enabled,
                             None if policy_id is not None else policy, policy_id)
    if state == -2:
        return object.__new__(autocast)
    if state == -1:
        return torch.amp.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
    return _policy_region((device_type, dtype, enabled, cache_enabled), state)


def _table_for_trace(device_type, dtype, enabled, cache_enabled, policy, policy_id) -> int:
    """Dynamo calls this while it traces (it does not trace into it): checks the arguments as an
    eager region does, and returns the table the region activates, or -1 where torch's own
    region does the same (torch's policy, and none of ours active around it), or -2 where dynamo
    is compiling autocast.__new__ itself as a frame (called from code it runs eagerly): that call
    must make an eager region. `policy_id`: id() of the region's Policy (then `policy` is None)."""
    _dynamo_setup()
    if policy_id is not None:  # alive: the frame being traced holds it
        policy = ctypes.cast(policy_id, ctypes.py_object).value
    symbolic_convert = sys.modules["torch._dynamo.symbolic_convert"]
    tracer = getattr(symbolic_convert.tls, "current_tx", None)
    if tracer is not None and tracer.f_code is autocast.__new__.__code__:
        return -2
    region = object.__new__(autocast)
    region.__init__(device_type, dtype, enabled, cache_enabled, policy=policy)
    if region._state == 0 and _current_state(device_type) == 0:
        return -1
    return region._state


def _dynamo_setup() -> None:
    """Once dynamo is loaded (importing it takes seconds, so not at our import): the policy nodes
    go into graphs, and dynamo never compiles an eager region's methods as frames of their own
    (they switch C++ state that it cannot see; inside traced code they are inlined, not run)."""
    global _dynamo_ready
    if _dynamo_ready:
        return
    # torch 2.11's dynamo cannot type torch's autocast object (2.14's can), so the isinstance(obj,
    # autocast) it makes after tracing our __new__ fails when that returned torch.amp.autocast.
    # Give it the type 2.14 gives it (torch.amp.autocast: not ours, so no __init__ is traced).
    autocast_variable = torch._dynamo.variables.ctx_manager.AutocastModeVariable
    if "python_type" not in vars(autocast_variable):
        autocast_variable.python_type = lambda self: torch.amp.autocast_mode.autocast
    torch.compiler.allow_in_graph(_enter_policy)
    torch.compiler.allow_in_graph(_exit_policy)
    skip_code = torch._dynamo.eval_frame.skip_code
    for fn in (autocast.__new__, autocast.__init__, autocast.__enter__, autocast.__exit__,
               _policy_region.__wrapped__, _enter_policy, _exit_policy, _restore_to):
        skip_code(fn.__code__)
    _dynamo_ready = True


def _module_table_for_trace(policy_id: int) -> int:
    """Dynamo calls this while it traces a set_policy module's hook: the table its policy
    activates (by id(), as _table_for_trace). In a trace the module's switch becomes the same
    graph nodes as a region's, so a per-module policy costs no graph break."""
    _dynamo_setup()
    policy = ctypes.cast(policy_id, ctypes.py_object).value  # alive: the hook's closure holds it
    return policy.state(weight_cache=False)


_table_for_trace._dynamo_marked_constant = True  # what torch._dynamo.assume_constant_result sets
_module_table_for_trace._dynamo_marked_constant = True


@contextlib.contextmanager
def _policy_region(args: tuple, state: int) -> Iterator[None]:
    """A region with mixprec's own policy inside a traced function (see above)."""
    with torch.amp.autocast(*args):
        _enter_policy(args[0], state)
        try:
            yield
        finally:
            _exit_policy()


@torch.fx.node.has_side_effect
def _enter_policy(device_type: str, state: int) -> None:
    """Graph node: activate table `state` on this thread until the matching _exit_policy."""
    depth = len(_compiled.saved)
    _compiled.saved.append((device_type, _swap(device_type, state)))
    symbolic_convert = sys.modules.get("torch._dynamo.symbolic_convert")
    tracer = getattr(symbolic_convert.tls, "current_tx", None) if symbolic_convert else None
    if tracer is not None:  # dynamo may stop tracing inside the region: restore then too
        tracer.output.add_cleanup_hook(functools.partial(_restore_to, depth))


@torch.fx.node.has_side_effect
def _exit_policy() -> None:
    """Graph node: restore the table active before the matching _enter_policy."""
    _restore_to(len(_compiled.saved) - 1)


def _restore_to(depth: int) -> None:
    while len(_compiled.saved) > depth:
        device_type, previous = _compiled.saved.pop()
        _swap(device_type, previous)


# ---- per-module policies -----------------------------------------------------------------------
_HOOKS_ATTR = "_mixprec_policy_hooks"


class _PerThread(threading.local):
    """A hook pair's save stack, one per thread: the pre-hook pushes what it changed, the post-hook
    pops it. Policies and torch's autocast state are per thread, so a module called by two
    threads at once must restore each thread's own state, not the other's."""

    def __init__(self) -> None:  # threading.local runs it again in every thread
        self.stack: list = []


def _remove_hooks(module: torch.nn.Module) -> None:
    for handle in getattr(module, _HOOKS_ATTR, ()):
        handle.remove()
    if hasattr(module, _HOOKS_ATTR):
        delattr(module, _HOOKS_ATTR)


def set_policy(module: torch.nn.Module, policy: Policy | None) -> torch.nn.Module:
    """Run `module`'s forward (its whole subtree) under `policy` whenever autocast is enabled for
    the policy's device type, whatever policy the surrounding region uses (the region's dtype
    still gives `lower` its meaning). None removes a policy set before. Returns the module."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"set_policy expects an nn.Module, got {type(module).__name__}")
    _remove_hooks(module)
    if policy is None:
        return module
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a mixprec.Policy, got {type(policy).__name__}")
    device_type = policy.device_type
    saved = _PerThread()  # the module may run in several threads at once

    def enter(mod, args):
        if torch.compiler.is_compiling():  # the same switch, as graph nodes (see torch.compile below)
            if torch.is_autocast_enabled(device_type):
                _enter_policy(device_type, _module_table_for_trace(id(policy)))
            return
        if torch.is_autocast_enabled(device_type):
            weight_cache = _extension.load().autocast_active(device_type)[1]
            saved.stack.append(_swap(device_type, policy.state(weight_cache=weight_cache)))
        else:
            saved.stack.append(None)

    def leave(mod, args, output):
        if torch.compiler.is_compiling():  # a region entered in the forward has exited by now
            if torch.is_autocast_enabled(device_type):
                _exit_policy()
            return
        previous = saved.stack.pop()
        if previous is not None:
            _swap(device_type, previous)

    setattr(module, _HOOKS_ATTR, [
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),
    ])
    return module


def _to_fp32(value: Any) -> Any:
    def cast(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
            return t.float()
        return t

    return torch.utils._pytree.tree_map(cast, value)


def keep_fp32(module: torch.nn.Module) -> torch.nn.Module:
    """Run `module`'s subtree in fp32 under any autocast region: autocast is disabled inside it
    and its fp16/bf16 floating inputs are cast to fp32 (its outputs are fp32). Returns the module."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"keep_fp32 expects an nn.Module, got {type(module).__name__}")
    _remove_hooks(module)
    regions = _PerThread()  # the module may run in several threads at once

    def enter(mod, args, kwargs):
        active = [d for d in DEVICE_TYPES if torch.is_autocast_enabled(d)]
        off = [torch.amp.autocast(d, enabled=False) for d in active]
        for region in off:
            region.__enter__()
        regions.stack.append(off)
        return (_to_fp32(args), _to_fp32(kwargs)) if active else None

    def leave(mod, args, output):
        for region in reversed(regions.stack.pop()):
            region.__exit__(None, None, None)

    setattr(module, _HOOKS_ATTR, [
        module.register_forward_pre_hook(enter, with_kwargs=True),
        module.register_forward_hook(leave, always_call=True),
    ])
    return module


# ---- custom autograd functions --------------------------------------------------------------------
def custom_fwd(fwd: Callable | None = None, *, device_type: str, cast_inputs: torch.dtype | None = None):
    """torch.amp.custom_fwd, which also remembers the mixprec policy active in forward so that
    `custom_bwd` runs backward under the same policy (torch re-enters only its own state)."""
    if fwd is None:
        return functools.partial(custom_fwd, device_type=device_type, cast_inputs=cast_inputs)
    torch_fwd = torch.amp.custom_fwd(fwd, device_type=device_type, cast_inputs=cast_inputs)

    @functools.wraps(fwd)
    def forward(ctx, *args, **kwargs):
        ctx._mixprec_state = _current_state(device_type)
        ctx._mixprec_device_type = device_type
        return torch_fwd(ctx, *args, **kwargs)

    return forward


def custom_bwd(bwd: Callable | None = None, *, device_type: str):
    """torch.amp.custom_bwd, plus the mixprec policy that was active in forward."""
    if bwd is None:
        return functools.partial(custom_bwd, device_type=device_type)
    torch_bwd = torch.amp.custom_bwd(bwd, device_type=device_type)

    @functools.wraps(bwd)
    def backward(ctx, *args):
        previous = _swap(device_type, getattr(ctx, "_mixprec_state", 0))
        try:
            return torch_bwd(ctx, *args)
        finally:
            _swap(device_type, previous)

    return backward


def clear_weight_cache() -> None:
    """Drop every cast kept by weight_cache=True regions."""
    _extension.load().autocast_weight_cache_clear()


def weight_cache_info() -> dict[str, int]:
    """Live entries of the persistent weight cache and the bytes they hold."""
    entries, nbytes = _extension.load().autocast_weight_cache_info()
    return {"entries": entries, "bytes": nbytes}


__all__ = [
    "autocast", "clear_weight_cache", "custom_bwd", "custom_fwd", "keep_fp32", "set_policy",
    "weight_cache_info",
]
