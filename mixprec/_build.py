"""Finds the compilers mixprec's C++/CUDA sources need. Imported by setup.py by path (before the
package can be imported), so it uses nothing but the standard library."""
from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path


def find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the toolkit that owns nvcc.

    torch's own guess takes the parent of nvcc's directory, which is wrong when nvcc is a
    wrapper script in /usr/local/bin (as on our machines: the toolkit is /usr/local/cuda, and
    torch's guess, /usr/local, fails to link with `cannot find -lcudart`).
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if (Path("/usr/local/cuda") / "bin" / "nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def has_nvcc(cuda_home: str | None) -> bool:
    return cuda_home is not None and (Path(cuda_home) / "bin" / "nvcc").exists()


def missing_for_cpu_build() -> list[str]:
    """What a CPU build of the extension lacks on this machine, each with the fix."""
    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ('{cxx}' is not on PATH): install g++ (apt-get install g++)")
    if shutil.which("ninja") is None:
        missing.append("ninja (not on PATH): pip install ninja")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.exists():
        missing.append(f"the Python headers ({header} is missing): install python3-dev")
    return missing
