"""The op-policy table behind mixprec.autocast: which dtype each op runs in, per device type.

A Policy maps aten ops (overloads such as ``aten::softmax.int``) to a rule:

- ``lower``: cast floating inputs to the region's autocast dtype (torch: lower_precision_fp);
- ``fp16`` / ``bf16`` / ``fp32``: always run in that dtype, whatever the region's dtype;
- ``promote``: run in the widest floating input dtype (torch's promote);
- ``keep``: no cast (the op runs in whatever dtypes it is given);
- torch's special cases: ``fp32_set_opt_dtype`` (fill the op's ``dtype=None`` argument with
  float32: softmax, sum, cumsum, ...) and ``fp32_append_dtype`` (aten::norm: call the overload
  that takes a dtype, with float32);
- ``fp8`` (aten::linear only): fp8 operands through torch._scaled_mm (mixprec.fp8), the output
  in the region's dtype.

Ops not in the table are ``keep``. ``default_policy(device_type)`` is torch's own table for the
installed torch: the CUDA lists are read from the torch headers mixprec was compiled against, the
CPU list is written out below (torch keeps it in a .cpp file), and every op torch registers that
neither names is listed with rule ``torch`` (torch's own kernel, kept as is) — the tests check
there are none beyond the documented ones. Policies are immutable: ``override`` returns a new one.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Union

import torch

from mixprec import _extension

# Rules that only torch's own kernels implement; they appear in default tables, users cannot set
# them. "banned": torch raises (binary_cross_entropy under CUDA autocast). "torch": a kernel with
# its own logic (aten::_cudnn_rnn's flat weights).
TORCH_ONLY_RULES = ("banned", "torch")
DEVICE_TYPES = ("cuda", "cpu")
# Rules that cast to a low-precision dtype: the ones the persistent weight cache serves.
LOW_PRECISION_RULES = ("lower", "fp16", "bf16", "promote")


@functools.cache
def rule_names() -> tuple[str, ...]:
    """The rules a policy can set, from the C++ table that parses them (csrc/autocast/rules.h)."""
    return tuple(_extension.load().autocast_rule_names())


OpLike = Union[str, Callable[..., Any], "torch._ops.OpOverload", "torch._ops.OpOverloadPacket"]

# torch.nn.functional names whose aten op is named differently.
_FUNCTIONAL_TO_ATEN = {
    "cross_entropy": "cross_entropy_loss",
    "multi_head_attention_forward": "_native_multi_head_attention",
}

# torch's CPU autocast lists (aten/src/ATen/autocast_mode.cpp, TORCH_LIBRARY_IMPL(aten,
# AutocastCPU)); entries the running torch does not register are dropped.
_CPU_LOWER = """conv1d conv1d.padding conv2d conv2d.padding conv3d conv3d.padding bmm mm
    linalg_vecdot baddbmm addmm _addmm_activation addbmm linear _convolution.deprecated matmul
    conv_tbc mkldnn_rnn_layer conv_transpose1d conv_transpose2d.input conv_transpose3d.input prelu
    scaled_dot_product_attention _native_multi_head_attention"""
_CPU_FP32 = """avg_pool3d binary_cross_entropy grid_sampler polar prod prod.dim_int prod.dim_Dimname quantile
    quantile.scalar nanquantile nanquantile.scalar stft stft.center cdist grid_sampler_2d
    _grid_sampler_2d_cpu_fallback grid_sampler_3d trace view_as_complex cholesky cholesky_inverse
    cholesky_solve inverse lu_solve orgqr ormqr pinverse max_pool3d max_unpool2d max_unpool3d
    adaptive_avg_pool3d reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d
    replication_pad3d mse_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss
    poisson_nll_loss smooth_l1_loss cross_entropy_loss l1_loss huber_loss margin_ranking_loss
    soft_margin_loss triplet_margin_loss multi_margin_loss ctc_loss.IntList ctc_loss.Tensor kl_div
    multilabel_margin_loss binary_cross_entropy_with_logits fft_fft fft_ifft fft_fft2 fft_ifft2
    fft_fftn fft_ifftn fft_rfft fft_irfft fft_rfft2 fft_irfft2 fft_rfftn fft_irfftn fft_hfft
    fft_ihfft linalg_cond linalg_cond.p_str linalg_matrix_rank linalg_matrix_rank.tol_tensor
    linalg_matrix_rank.atol_rtol_tensor linalg_matrix_rank.atol_rtol_float linalg_solve
    linalg_cholesky linalg_svdvals linalg_eigvals linalg_eigvalsh linalg_inv
    linalg_householder_product linalg_tensorinv linalg_tensorsolve fake_quantize_per_tensor_affine
    geqrf _lu_with_info qr svd triangular_solve fractional_max_pool2d fractional_max_pool3d
    adaptive_max_pool3d multilabel_margin_loss_forward linalg_qr linalg_cholesky_ex linalg_svd
    linalg_eig linalg_eigh linalg_lstsq linalg_inv_ex linalg_matrix_sqrth"""
_CPU_PROMOTE = "stack cat index_copy index_copy.dimname"
# CUDA entries registered outside the header's lists.
_CUDA_EXTRA = {
    "aten::cudnn_convolution": "lower",
    "aten::cudnn_convolution_transpose": "lower",
    "aten::binary_cross_entropy": "banned",
    "aten::_cudnn_rnn": "torch",
    "aten::linalg_matrix_sqrth": "fp32",
}


def op_key(name: str, overload: str) -> str:
    """``aten::softmax.int``; the default overload is written without a suffix."""
    return f"{name}.{overload}" if overload else name


def _split(key: str) -> tuple[str, str]:
    ns_name, _, overload = key.partition("::")[2].partition(".")
    return "aten::" + ns_name, overload


def _registered(dispatch_key: str) -> set[str]:
    """aten ops with a kernel at torch's autocast key (other libraries' ops, such as torchvision's
    nms and roi_align, keep their own autocast kernels and are not part of the table)."""
    return {op for op in torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
            if op.startswith("aten::")}


def _torch_table(device_type: str) -> dict[str, str]:
    registered = _registered("AutocastCUDA" if device_type == "cuda" else "AutocastCPU")
    table: dict[str, str] = {}
    if device_type == "cuda":
        for name, overload, rule in _extension.load().autocast_torch_cuda_rules():
            table[op_key(name, overload)] = rule
        table.update(_CUDA_EXTRA)
    else:
        for rule, names in (("lower", _CPU_LOWER), ("fp32", _CPU_FP32), ("promote", _CPU_PROMOTE)):
            table.update({"aten::" + n: rule for n in names.split()})
    table = {op: rule for op, rule in table.items() if op in registered}
    for op in registered - table.keys():  # newer torch: keep its kernel (tests flag these)
        table[op] = "torch"
    return dict(sorted(table.items()))


def _overload(key: str) -> torch._ops.OpOverload:
    name, overload = _split(key)
    packet = getattr(torch.ops.aten, name.partition("::")[2])
    return getattr(packet, overload or "default")


def _is_functional(schema: torch._C.FunctionSchema) -> bool:
    """A dispatcher op (not a TorchScript-only builtin such as aten::add.int) that writes none of
    its arguments: in-place and out= overloads are never autocast (torch's rule as well)."""
    try:
        torch._C._dispatch_find_schema_or_throw(schema.name, schema.overload_name)
    except RuntimeError:
        return False
    return not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def resolve_op(op: OpLike) -> list[str]:
    """The functional aten overloads an op-like names: an OpOverload, an OpOverloadPacket, a
    string (``"aten::softmax.int"``, ``"softmax"``) or a torch / torch.nn.functional callable."""
    if isinstance(op, torch._ops.OpOverload):
        overloads = [op]
    else:
        if isinstance(op, torch._ops.OpOverloadPacket):
            packet = op
        elif isinstance(op, str):
            name, _, overload = op.removeprefix("aten::").partition(".")
            packet = getattr(torch.ops.aten, name, None) if name else None
            if packet is not None and overload:
                if overload not in packet.overloads():
                    raise ValueError(f"aten::{name} has no overload {overload!r}; it has {packet.overloads()}")
                return resolve_op(getattr(packet, overload))
        elif callable(op):
            name = getattr(op, "__name__", "")
            packet = getattr(torch.ops.aten, _FUNCTIONAL_TO_ATEN.get(name, name), None) if name else None
        else:
            raise TypeError(f"a policy key must be an op (callable, torch.ops.aten op or name), got {op!r}")
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            raise ValueError(  # noqa: TRY004 - the key's type is fine, its value names no aten op
                f"{op!r} does not name an aten op; pass the op itself, e.g. torch.ops.aten.softmax "
                "or 'aten::softmax.int'"
            )
        overloads = [getattr(packet, o) for o in packet.overloads()]
    keys = [op_key(o._schema.name, o._schema.overload_name) for o in overloads if _is_functional(o._schema)]
    if not keys:
        raise ValueError(f"{op!r}: in-place and out= ops are never cast by autocast")
    return keys


def _check_rule(key: str, rule: str) -> bool:
    """Whether `rule` can apply to `key` (False: skip this overload of a packet)."""
    if rule not in rule_names():
        raise ValueError(f"unknown rule {rule!r} for {key}; valid rules: {', '.join(rule_names())}")
    if rule == "fp32_set_opt_dtype":
        return any(str(a.real_type) == "Optional[ScalarType]" for a in _overload(key)._schema.arguments)
    if rule == "fp8":  # aten::linear only (mixprec.fp8 defines the op the kernel calls)
        import mixprec.fp8  # noqa: F401
        return key == "aten::linear"
    if rule == "fp32_append_dtype":  # aten::norm overloads with a dtype-taking sibling
        name, overload = _split(key)
        sibling = "ScalarOpt_dtype" if overload == "Scalar" else overload + "_dtype"
        return name == "aten::norm" and sibling in torch.ops.aten.norm.overloads()
    return True


class Policy(Mapping[str, str]):
    """An immutable op → rule table for one device type (a read-only mapping of aten overload
    names to rule names). Build one with ``default_policy(device_type).override({...})``."""

    def __init__(self, device_type: str, rules: Mapping[str, str]) -> None:
        if device_type not in DEVICE_TYPES:
            raise ValueError(f"mixprec.autocast supports device types {DEVICE_TYPES}, got {device_type!r}")
        self.device_type = device_type
        self._rules = MappingProxyType(dict(rules))
        self._compiled: dict[tuple[bool, bool], int] = {}

    def __getitem__(self, op: str) -> str:
        return self._rules[op]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def rule(self, op: OpLike) -> str:
        """The rule of an op (of its first functional overload for a packet or callable)."""
        return self._rules.get(resolve_op(op)[0], "keep")

    def override(self, changes: Mapping[OpLike, str]) -> Policy:
        """A new policy: this one with `changes` (op-like → rule name) applied. Every key and rule
        is checked here, so a mistake fails now, not in the middle of a forward."""
        if not isinstance(changes, Mapping):
            raise TypeError(f"override takes a mapping of op → rule, got {type(changes).__name__}")
        rules = dict(self._rules)
        for op, rule in changes.items():
            if not isinstance(rule, str):
                raise TypeError(f"the rule for {op!r} must be a rule name ({', '.join(rule_names())}), got {rule!r}")
            keys = [k for k in resolve_op(op) if _check_rule(k, rule)]
            if not keys:
                raise ValueError(f"rule {rule!r} does not apply to {op!r} (see mixprec.policy's docstring)")
            rules.update(dict.fromkeys(keys, rule))
        return Policy(self.device_type, rules)

    def differences(self, other: Mapping[str, str]) -> dict[str, tuple[str, str]]:
        """op → (rule here, rule in `other`) where they differ."""
        ops = set(self._rules) | set(other)
        return {op: (self._rules.get(op, "keep"), other.get(op, "keep"))
                for op in sorted(ops) if self._rules.get(op, "keep") != other.get(op, "keep")}

    def __repr__(self) -> str:
        changed = self.differences(default_policy(self.device_type))
        return f"Policy({self.device_type!r}, {len(self)} ops, {len(changed)} differ from torch's)"

    def state(self, *, weight_cache: bool = False, handle_all: bool = False) -> int:
        """The id of the C++ table that activates this policy (0: nothing for mixprec to do,
        torch's own autocast kernels apply), built on first use: rules travel to C++ as their
        names, parsed there once. mixprec's kernel handles the ops whose rule differs from
        torch's, every op with `handle_all` (the conformance tests), and the casting ops with
        `weight_cache` (whose casts it then serves from the persistent weight cache)."""
        flags = (weight_cache, handle_all)
        if flags not in self._compiled:
            torch_rules = default_policy(self.device_type)
            handled = [
                (*_split(op), rule) for op, rule in self._rules.items()
                if rule not in TORCH_ONLY_RULES and (
                    handle_all or rule != torch_rules.get(op, "keep")
                    or (weight_cache and rule in LOW_PRECISION_RULES))
            ]
            self._compiled[flags] = _extension.load().autocast_table_new(handled, weight_cache) if handled else 0
        return self._compiled[flags]


_DEFAULTS: dict[str, Policy] = {}


def default_policy(device_type: str) -> Policy:
    """torch.autocast's own table for `device_type` ("cuda" or "cpu") in the installed torch
    (the same for fp16 and bf16 regions: torch's lists do not depend on the dtype)."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"mixprec.autocast supports device types {DEVICE_TYPES}, got {device_type!r}")
    if device_type not in _DEFAULTS:
        _DEFAULTS[device_type] = Policy(device_type, _torch_table(device_type))
    return _DEFAULTS[device_type]
