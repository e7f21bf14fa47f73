"""`mixprec doctor`: facts about this machine, the kernels built (every op the dispatcher lists),
a recommendation with a reason, and a broken build reported with its reason instead of raised."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mixprec import hardware, ops
from mixprec.doctor import kernels_built, report

ROOT = Path(__file__).resolve().parent.parent
# Runs `python -m mixprec ARGS` on the copy of the package in the working directory, not the
# editable install (whose finder would map mixprec._C to the built extension).
COLD_MAIN = ("import sys, runpy; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
             "sys.argv = ['mixprec', *sys.argv[1:]]; runpy.run_module('mixprec', run_name='__main__', alter_sys=True)")


def copy_package(dest: Path, with_csrc: bool = True) -> None:
    """A source checkout of mixprec at `dest` without any built extension."""
    if with_csrc:
        shutil.copytree(ROOT / "csrc", dest / "csrc")
    shutil.copytree(ROOT / "mixprec", dest / "mixprec", ignore=shutil.ignore_patterns("*.so", "__pycache__"))


def run_cold(cwd: Path, *args: str, path: str = "", timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m mixprec ARGS` in `cwd` with only `path` on PATH (no compiler, no ninja) and an
    empty extension cache of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env.update(PATH=path, PYTHONPATH=str(cwd), TORCH_EXTENSIONS_DIR=str(cwd / "ext"))
    return subprocess.run([sys.executable, "-c", COLD_MAIN, *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_doctor_reports_this_machine():
    out = subprocess.run([sys.executable, "-m", "mixprec", "doctor"], capture_output=True, text=True, check=True).stdout
    assert f"torch: {torch.__version__}" in out
    assert "mixprec CPU kernels: built" in out
    assert f"mixprec ops: {len(ops.op_names())}" in out
    assert ("GPU: none (CPU only)" in out) != torch.cuda.is_available()
    precision, reason = hardware.recommended_precision(hardware.device_facts())
    assert f"recommended precision: {precision}" in out and f"why: {reason}" in out


def test_kernels_built_matches_the_dispatcher():
    built = kernels_built()
    assert built["CPU"]
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mixprec::")]
    assert {"mixprec::clip_coef", "mixprec::clip_grad_norm_scaled", "mixprec::adam_step_"} <= set(names)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert built["CUDA"] == all(has(n, "CUDA") for n in names)


def test_report_labels_every_line():
    lines = dict(report())
    assert lines["torch"] == torch.__version__ and lines["mixprec CPU kernels"] == "built"


def test_doctor_without_a_build_or_a_compiler_names_what_is_missing(tmp_path):
    copy_package(tmp_path)
    out = run_cold(tmp_path, "doctor")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mixprec kernels: not built — missing: a C++ compiler ('c++' is not on PATH)" in out.stdout
    assert "ninja (not on PATH): pip install ninja" in out.stdout
    assert "fix: install what is missing, then: pip install --no-build-isolation -e ." in out.stdout
    assert "recommended precision:" in out.stdout
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").iterdir()), "doctor built something"


def test_doctor_with_a_compiler_says_the_first_use_builds(tmp_path):
    copy_package(tmp_path)
    out = run_cold(tmp_path, "doctor", path=os.environ["PATH"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mixprec kernels: not built — the first use compiles csrc/ just in time" in out.stdout
    assert "fix: build it now: pip install --no-build-isolation -e ." in out.stdout
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").iterdir()), "doctor built something"


def test_doctor_reports_a_broken_build_with_the_reason(tmp_path):
    copy_package(tmp_path)
    built = next((ROOT / "mixprec").glob("_C*.so"))
    (tmp_path / "mixprec" / built.name).write_bytes(b"not a shared library" * 100)
    out = run_cold(tmp_path, "doctor")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mixprec kernels: broken — ImportError:" in out.stdout and "invalid ELF header" in out.stdout
    assert "fix: rebuild against the installed torch: pip install --no-build-isolation -e ." in out.stdout


def test_doctor_of_an_installation_without_sources(tmp_path):
    copy_package(tmp_path, with_csrc=False)
    out = run_cold(tmp_path, "doctor")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mixprec kernels: not built — mixprec._C is missing from this installation" in out.stdout
