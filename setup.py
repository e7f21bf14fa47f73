"""Builds mixprec._C: a CppExtension, or a CUDAExtension when torch has CUDA and nvcc exists.

Install with `pip install --no-build-isolation -e .` (torch must already be installed: the
extension is compiled against it). Set MIXPREC_FORCE_CPU=1 to skip the CUDA sources. Sources,
flags and the CUDA decision live in mixprec/_build.py, shared with the just-in-time build.
"""
import importlib.util
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _load_build_config():
    # By path: the package itself cannot be imported before it is built.
    spec = importlib.util.spec_from_file_location("_build", ROOT / "mixprec" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_config()

import torch

cuda_home = build.find_cuda_home()
with_cuda = build.build_cuda(torch.version.cuda, cuda_home)
if with_cuda:
    build.prepare_cuda_env(cuda_home, gpu_present=torch.cuda.is_available())

# Imported after prepare_cuda_env: torch.utils.cpp_extension reads CUDA_HOME when imported.
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension


def _extension():
    sources = [str(p.relative_to(ROOT)) for p in build.sources(with_cuda)]
    include_dirs = [str(p) for p in build.INCLUDE_DIRS]
    extra = {"cxx": build.CXX_FLAGS}
    if not with_cuda:
        return CppExtension("mixprec._C", sources, include_dirs=include_dirs, extra_compile_args=extra)
    extra["nvcc"] = build.NVCC_FLAGS
    return CUDAExtension("mixprec._C", sources, include_dirs=include_dirs, extra_compile_args=extra)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
