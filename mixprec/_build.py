"""How mixprec's C++/CUDA extension is built: the sources, include directories, flags, whether
the CUDA kernels are compiled, and the tools each build needs. One configuration for setup.py
(which loads this file by path, before the package can be imported) and for the just-in-time
build in _extension.py, so it uses nothing but the standard library."""
from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
INCLUDE_DIRS = [CSRC / "include"]
# -fopenmp: at::parallel_for is OpenMP in headers (without it, serial). -ffp-contract=off: the
# optimizer maths places its fused multiply-adds explicitly (optim_math.h); no others.
# -fno-math-errno (sqrt need not set errno: nothing reads it) and -fno-trapping-math (no program
# of ours unmasks floating-point traps) let the compiler vectorize loops with square roots and
# divisions under a select (compressed_block_loops.h); neither changes a result: every operation
# stays the same correctly rounded IEEE operation, in the same order (no -ffast-math).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
# A build machine without a GPU compiles for these (A100, H100/H200); with one, torch picks its arch.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
FORCE_CPU_VAR = "MIXPREC_FORCE_CPU"


def sources(cuda: bool, csrc: Path = CSRC) -> list[Path]:
    """The C++ sources (csrc/*.cpp, csrc/cpu/*.cpp, csrc/autocast/*.cpp), and csrc/cuda/*.cu
    with cuda=True. The just-in-time build names object files by stem, so stems must differ."""
    found = [p for pattern in ("*.cpp", "cpu/*.cpp", "autocast/*.cpp") for p in sorted(csrc.glob(pattern))]
    if cuda:
        found += sorted(csrc.glob("cuda/*.cu"))
    stems: dict[str, Path] = {}
    for path in found:
        if path.stem in stems:
            raise RuntimeError(f"csrc: {stems[path.stem]} and {path} have the same stem; ninja would build "
                               "both into one object file: rename one")
        stems[path.stem] = path
    return found


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


def build_cuda(torch_cuda_version: str | None, cuda_home: str | None, gpu_present: bool | None = None) -> bool:
    """Whether to compile the CUDA kernels: torch is a CUDA build, nvcc exists and
    $MIXPREC_FORCE_CPU is not 1. The just-in-time build also passes gpu_present: without a GPU
    the CUDA kernels could not run, and compiling them takes minutes."""
    if os.environ.get(FORCE_CPU_VAR) == "1" or gpu_present is False:
        return False
    return torch_cuda_version is not None and has_nvcc(cuda_home)


def prepare_cuda_env(cuda_home: str, gpu_present: bool) -> None:
    """Set CUDA_HOME (before torch.utils.cpp_extension is imported: it reads it then) and, with
    no GPU to ask, the architectures to compile for."""
    os.environ["CUDA_HOME"] = cuda_home
    if not gpu_present:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)


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
