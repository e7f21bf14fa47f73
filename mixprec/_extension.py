"""Loads mixprec's compiled ops (the `mixprec._C` extension, which registers torch.ops.mixprec.*).

Order: the extension built by `pip install`; else, in a source checkout, a just-in-time build
of csrc/ with ninja into torch's extension cache; else an ImportError that says what is missing.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from mixprec import _toolchain

_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _jit_build(first_error: ImportError) -> ModuleType:
    missing = _toolchain.missing_for_cpu_build()
    if missing:
        raise ImportError(
            "mixprec's compiled extension (mixprec._C) is not built and cannot be built here; "
            "missing: " + "; ".join(missing)
            + ". Or install a built package: pip install --no-build-isolation -e ."
        ) from first_error
    cuda_home = _toolchain.find_cuda_home()
    import torch

    with_cuda = bool(torch.version.cuda) and torch.cuda.is_available() and _toolchain.has_nvcc(cuda_home)
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    sources = [_CSRC / "ops.cpp", _CSRC / "autocast.cpp", *sorted((_CSRC / "cpu").glob("*.cpp"))]
    if with_cuda:
        sources += sorted((_CSRC / "cuda").glob("*.cu"))
    return cpp_extension.load(
        name="mixprec_C_cuda" if with_cuda else "mixprec_C_cpu",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(_CSRC / "include")],
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],  # as setup.py, which says why
        extra_cuda_cflags=["-O3", "-lineinfo"],
        with_cuda=with_cuda,
        is_python_module=True,  # the module's functions drive autocast; loading it registers the ops
    )


_module: ModuleType | None = None


def load() -> ModuleType:
    """Make torch.ops.mixprec.* available, building the extension if needed; returns the module
    (its functions drive mixprec.autocast)."""
    global _module
    if _module is not None:
        return _module
    try:
        from mixprec import _C

        _module = _C
        return _module
    except ImportError as err:
        if not _CSRC.is_dir():
            raise ImportError(
                "mixprec's compiled extension (mixprec._C) is missing from this installation and "
                "there is no csrc/ to build it from; reinstall: pip install --no-build-isolation mixprec"
            ) from err
        _module = _jit_build(err)
        return _module
