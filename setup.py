"""Builds mixprec._C: a CppExtension, or a CUDAExtension when torch has CUDA and nvcc exists.

Install with `pip install --no-build-isolation -e .` (torch must already be installed: the
extension is compiled against it). Set MIXPREC_FORCE_CPU=1 to skip the CUDA sources.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _load_toolchain():
    spec = importlib.util.spec_from_file_location("_toolchain", ROOT / "mixprec" / "_toolchain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toolchain = _load_toolchain()
cuda_home = toolchain.find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _build_cuda() -> bool:
    if os.environ.get("MIXPREC_FORCE_CPU") == "1":
        return False
    return torch.version.cuda is not None and toolchain.has_nvcc(cuda_home)


def _extension():
    sources = ["csrc/ops.cpp", "csrc/autocast.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp"))
    include_dirs = [str(ROOT / "csrc/include")]
    # -fopenmp: at::parallel_for is OpenMP in headers (without it, serial). -ffp-contract=off: the
    # optimizer maths places its fused multiply-adds explicitly (optim_math.h); no others.
    extra = {"cxx": ["-O3", "-fopenmp", "-ffp-contract=off"]}
    if not _build_cuda():
        return CppExtension("mixprec._C", sources, include_dirs=include_dirs, extra_compile_args=extra)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # A100 and H100 when no GPU tells us
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").glob("*.cu"))
    extra["nvcc"] = ["-O3", "-lineinfo"]
    return CUDAExtension("mixprec._C", sources, include_dirs=include_dirs, extra_compile_args=extra)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
