"""mixprec.hardware: the facts and advice shared by `mixprec doctor` and mixprec.Precision."""
import subprocess
import sys

import pytest
import torch

from mixprec.hardware import cuda_facts, device_facts, precision_warning, recommended_precision

CPU = device_facts("cpu")
P100, V100, T4, A100, L4, H100 = (cuda_facts(n, c) for n, c in (
    ("P100", (6, 0)), ("V100", (7, 0)), ("T4", (7, 5)), ("A100", (8, 0)), ("L4", (8, 9)), ("H100", (9, 0))))


def test_facts_by_capability():
    assert (CPU.kind, CPU.capability, CPU.bf16, CPU.tensor_cores) == ("cpu", None, True, False)
    assert [f.tensor_cores for f in (P100, V100, T4, A100, H100)] == [False, True, True, True, True]
    assert [f.bf16 for f in (P100, V100, T4, A100, H100)] == [False, False, False, True, True]
    assert [f.fp8 for f in (A100, L4, H100)] == [False, True, True]
    assert H100.capability_str == "9.0"


def test_this_machine():
    facts = device_facts()
    assert facts.kind == ("cuda" if torch.cuda.is_available() else "cpu")
    if facts.kind == "cuda":
        assert facts.capability == torch.cuda.get_device_capability()


def test_recommendations():
    assert recommended_precision(CPU)[0] == "bf16-mixed"
    precision, reason = recommended_precision(H100)
    assert precision == "bf16-mixed" and reason.startswith("compute capability 9.0: bf16 tensor cores")
    assert recommended_precision(T4)[0] == "16-mixed"
    assert recommended_precision(P100)[0] == "32-true"


@pytest.mark.parametrize(("facts", "precision", "expected"), [
    (CPU, "16-mixed", "16-mixed on CPU is slower than bf16-mixed"),
    (CPU, "16-true", "16-true on CPU is slower than bf16-mixed"),
    (CPU, "bf16-mixed", None),
    (P100, "bf16-true", "this GPU (compute capability 6.0) has no tensor cores"),
    (T4, "bf16-mixed", "compute capability 7.5 has no bf16 tensor cores"),
    (T4, "16-mixed", None),
    (H100, "bf16-true", None),
    (P100, "32-true", None),
])
def test_precision_warnings(facts, precision, expected):
    message = precision_warning(facts, precision)
    assert message == expected if expected is None else expected in message


def test_imports_no_kernels():
    code = ("import sys, mixprec.hardware as h, mixprec._extension as e; h.device_facts(); "
            "assert not e.loaded() and 'mixprec.ops' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
