"""`mixprec doctor`: facts about this machine, the kernels built, a recommendation with a reason."""
import subprocess
import sys

import torch

from mixprec.doctor import kernels_built, recommend


def test_doctor_reports_this_machine():
    out = subprocess.run([sys.executable, "-m", "mixprec", "doctor"], capture_output=True, text=True, check=True).stdout
    assert f"torch: {torch.__version__}" in out
    assert "mixprec CPU kernels: built" in out
    assert ("GPU: none (CPU only)" in out) != torch.cuda.is_available()
    assert "recommended precision:" in out and "why:" in out


def test_kernels_built_matches_the_dispatcher():
    built = kernels_built()
    assert built["CPU"]
    assert built["CUDA"] == torch._C._dispatch_has_kernel_for_dispatch_key("mixprec::adam_step_", "CUDA")


def test_recommendations():
    assert recommend(False, None, False)[0] == "bf16-mixed"
    assert recommend(True, (9, 0), True)[0] == "bf16-mixed"   # H100
    assert recommend(True, (7, 5), False)[0] == "16-mixed"    # T4
    assert recommend(True, (6, 1), False)[0] == "32-true"     # no tensor cores
