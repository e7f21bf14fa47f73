"""mixprec.policy: torch's default tables, overrides and their errors, and the hand-over of rule
tables to C++ (rules travel as their names and are parsed once there; unknown ones are refused
with the valid names)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mixprec
from mixprec import _extension
from mixprec.policy import default_policy, rule_names

ROOT = Path(__file__).resolve().parent.parent
# ops torch registers with a kernel of its own logic, which mixprec keeps as is
TORCH_OWN = {"cpu": set(), "cuda": {"aten::_cudnn_rnn"}}


# ---- the default table ----------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_table_is_every_op_torch_registers_with_a_known_rule(device):
    key = "AutocastCUDA" if device == "cuda" else "AutocastCPU"
    registered = {op for op in torch._C._dispatch_get_registrations_for_dispatch_key(key) if op.startswith("aten::")}
    table = default_policy(device)
    assert set(table) == registered
    unknown = {op for op, rule in table.items() if rule == "torch"}
    assert unknown == TORCH_OWN[device], "torch added autocast ops mixprec has no rule for"
    assert table["aten::mm"] == "lower" and table["aten::linear"] == "lower"
    if device == "cuda":
        assert table["aten::softmax.int"] == "fp32_set_opt_dtype"
        assert table["aten::norm.Scalar"] == "fp32_append_dtype"
        assert table["aten::binary_cross_entropy"] == "banned"
    else:
        assert table["aten::cat"] == "promote" and table["aten::mse_loss"] == "fp32"


def test_torch_cuda_rules_arrive_as_rule_names():
    rules = _extension.load().autocast_torch_cuda_rules()
    assert rules and {rule for _, _, rule in rules} == {"lower", "fp32", "fp32_set_opt_dtype", "promote",
                                                        "fp32_append_dtype"}
    assert ("aten::norm", "Scalar", "fp32_append_dtype") in rules


# ---- overrides ----------------------------------------------------------------------------------
def _has_schema(key):
    name, _, overload = key.partition(".")
    try:
        torch._C._dispatch_find_schema_or_throw(name, overload)
        return True
    except RuntimeError:
        return False


def test_override_reaches_every_functional_overload_of_the_ops_named():
    policy = default_policy("cpu").override({F.softmax: "lower", torch.cumsum: "fp32", "aten::mm": "keep"})
    changed = policy.differences(default_policy("cpu"))
    named = {"aten::softmax.int", "aten::softmax.Dimname", "aten::cumsum", "aten::cumsum.dimname", "aten::mm"}
    in_dispatcher = {k for k in named if _has_schema(k)}
    assert set(changed) == in_dispatcher  # every functional overload the dispatcher knows
    assert changed["aten::mm"] == ("keep", "lower")
    assert policy.rule(torch.mm) == "keep" and policy.rule("aten::softmax.int") == "lower"
    assert default_policy("cpu").rule(torch.mm) == "lower"  # immutable: the base is unchanged


def test_bad_policies_fail_at_construction():
    base = default_policy("cpu")
    with pytest.raises(ValueError, match="unknown rule 'half'.*valid rules"):
        base.override({torch.mm: "half"})
    with pytest.raises(TypeError, match="must be an op"):
        base.override({42: "fp32"})
    with pytest.raises(ValueError, match="does not name an aten op"):
        base.override({"no_such_op": "fp32"})
    with pytest.raises(ValueError, match="does not name an aten op"):
        base.override({lambda x: x: "fp32"})
    with pytest.raises(ValueError, match="in-place and out= ops"):
        base.override({torch.ops.aten.add_.Tensor: "fp32"})
    with pytest.raises(ValueError, match="does not apply"):
        base.override({torch.mm: "fp32_append_dtype"})
    with pytest.raises(TypeError, match="rule name"):
        base.override({torch.mm: torch.float16})
    with pytest.raises(TypeError, match="mapping"):
        base.override([(torch.mm, "fp32")])
    with pytest.raises(ValueError, match="device types"):
        default_policy("xpu")
    with pytest.raises(ValueError, match="device types"):
        mixprec.Policy("mps", {})


@pytest.mark.parametrize("rule", ["torch", "banned", "FP16", ""])
def test_rules_only_torch_implements_or_misspelt_are_refused(rule):
    with pytest.raises(ValueError, match=f"unknown rule '{rule}' for aten::mm; valid rules: " + ", ".join(rule_names())):
        default_policy("cpu").override({torch.mm: rule})


# ---- the rule names: one table, in C++ --------------------------------------------------------
DOCUMENTED = ["lower", "fp16", "bf16", "fp32", "promote", "keep", "fp32_set_opt_dtype", "fp32_append_dtype", "fp8"]


def test_rule_names_come_from_cpp_and_match_the_docs():
    assert list(rule_names()) == DOCUMENTED
    readme = (ROOT / "README.md").read_text()
    bullet = re.search(r"^- Rules: (.*?)\n- ", readme, re.DOTALL | re.MULTILINE).group(1)
    assert re.findall(r"`(\w+)`", bullet) == DOCUMENTED
    docstring = mixprec.policy.__doc__.split("Ops not in the table")[0]
    assert re.findall(r"``(\w+)``", docstring) == DOCUMENTED


def test_cpp_refuses_unknown_rule_names_and_builds_nothing():
    new_table = _extension.load().autocast_table_new
    registered = set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastPrivateUse1"))
    # An op no earlier test handed to a policy (on the GPU machine, CUDA tests register sinh).
    unused = next(op for op in ("aten::sinh", "aten::special_bessel_j0", "aten::special_bessel_j1",
                                "aten::special_scaled_modified_bessel_k0") if op not in registered)
    expected = "mixprec.autocast: unknown rule 'half'; valid rules: " + ", ".join(DOCUMENTED)
    with pytest.raises(ValueError) as err:
        new_table([(unused, "", "fp32"), ("aten::mm", "", "half")], False)
    assert str(err.value) == expected
    with pytest.raises(ValueError, match="Could not find schema for aten::mm.no_such"):
        new_table([(unused, "", "fp32"), ("aten::mm", "no_such", "fp32")], False)
    with pytest.raises(ValueError, match="fp32_append_dtype applies only to aten::norm"):
        new_table([(unused, "", "fp32"), ("aten::mm", "", "fp32_append_dtype")], False)
    with pytest.raises(TypeError):
        new_table([(unused, "", 5)], False)  # the old integer codes
    assert set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastPrivateUse1")) == registered
    first = new_table([("aten::mm", "", "fp16")], False)
    assert new_table([("aten::mm", "", "bf16")], True) == first + 1  # the refused ones took no id


# ---- Policy.state: the id of the compiled table ----------------------------------------------
def test_state_compiles_once_per_options_and_carries_weight_cache():
    policy = default_policy("cpu").override({torch.exp: "bf16"})
    plain, cached = policy.state(), policy.state(weight_cache=True)
    assert plain > 0 and cached > 0 and plain != cached
    assert policy.state() == plain and policy.state(weight_cache=True) == cached  # built once
    assert default_policy("cpu").state() == 0  # torch's table: nothing for mixprec to do
    module = _extension.load()
    assert module.autocast_active("cpu") == (0, False)
    previous = module.autocast_swap("cpu", cached)
    try:
        assert module.autocast_active("cpu") == (cached, True)
        assert module.autocast_active("cuda") == (0, False)
    finally:
        module.autocast_swap("cpu", previous)
    assert module.autocast_active("cpu") == (0, False)


def test_swap_refuses_unknown_devices_and_tables():
    module = _extension.load()
    with pytest.raises(ValueError, match="device types"):
        module.autocast_swap("mps", 0)
    with pytest.raises(TypeError, match="device_type must be a str"):
        module.autocast_swap(0, 0)
    with pytest.raises(ValueError, match="no table with id"):
        module.autocast_swap("cpu", 10**9)
    with pytest.raises(ValueError, match="no table with id"):
        module.autocast_swap("cpu", -1)
    assert module.autocast_active("cpu") == (0, False)
