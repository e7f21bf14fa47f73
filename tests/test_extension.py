"""Loading the compiled ops: the just-in-time build from a source tree, its error message, and
the one build configuration (mixprec/_build.py) that setup.py and the just-in-time build share."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixprec import _build

ROOT = Path(__file__).resolve().parent.parent


def test_jit_build_from_a_source_tree_without_a_built_extension(tmp_path):
    """A checkout with no mixprec/_C*.so builds csrc/ with ninja on import and its ops work."""
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copytree(ROOT / "mixprec", tmp_path / "mixprec", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        # drop pip's editable-install finder, which would map mixprec._C to the built one
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        "import torch, mixprec; from pathlib import Path\n"
        "assert Path(mixprec.__file__).parent.parent == Path.cwd(), mixprec.__file__\n"
        "g = [torch.full((5,), 8.0), torch.full((3,), 8.0).bfloat16()]; f = torch.zeros(())\n"
        "mixprec.ops.non_finite_check_and_unscale_(g, f, torch.tensor(0.25))\n"
        "assert g[0].tolist() == [2.0] * 5 and g[1].float().tolist() == [2.0] * 3 and f.item() == 0\n"
        "assert 'mixprec._C' not in sys.modules, 'the prebuilt extension was imported'\n"
        "print('jit ok')\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PYTHONPATH": str(tmp_path),
           "CUDA_VISIBLE_DEVICES": ""}  # the CPU build is enough to prove the path, and fast
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "jit ok" in out.stdout, out.stderr[-3000:]
    assert any((tmp_path / "ext").rglob("*.so")), "no extension was built"


def test_missing_tools_are_named_with_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CXX", "no-such-c++")
    missing = " ".join(_build.missing_for_cpu_build())
    assert "'no-such-c++' is not on PATH" in missing and "apt-get install g++" in missing
    assert "pip install ninja" in missing


def test_build_sources_are_every_source_in_csrc():
    """A .cpp or .cu anywhere in csrc/ that the build would not compile is a mistake."""
    every = {p for p in _build.CSRC.rglob("*") if p.suffix in (".cpp", ".cu")}
    assert set(_build.sources(cuda=True)) == every
    assert set(_build.sources(cuda=False)) == {p for p in every if p.suffix == ".cpp"}
    assert (_build.CSRC / "ops.cpp") in _build.sources(cuda=False)


def test_build_sources_include_csrc_autocast_and_reject_equal_stems(tmp_path):
    for path in ("ops.cpp", "cpu/norm_cpu.cpp", "autocast/kernel.cpp", "cuda/norm_cuda.cu"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    names = [p.relative_to(tmp_path).as_posix() for p in _build.sources(cuda=True, csrc=tmp_path)]
    assert names == ["ops.cpp", "cpu/norm_cpu.cpp", "autocast/kernel.cpp", "cuda/norm_cuda.cu"]
    (tmp_path / "cpu" / "kernel.cpp").write_text("")
    with pytest.raises(RuntimeError, match=re.escape("kernel.cpp have the same stem")):
        _build.sources(cuda=False, csrc=tmp_path)


def test_cuda_build_decision(monkeypatch, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.delenv(_build.FORCE_CPU_VAR, raising=False)
    assert _build.build_cuda("13.0", str(tmp_path))
    assert not _build.build_cuda(None, str(tmp_path))          # a CPU-only torch
    assert not _build.build_cuda("13.0", str(tmp_path / "x"))  # no nvcc
    assert not _build.build_cuda("13.0", str(tmp_path), gpu_present=False)  # JIT without a GPU
    monkeypatch.setenv(_build.FORCE_CPU_VAR, "1")
    assert not _build.build_cuda("13.0", str(tmp_path))

