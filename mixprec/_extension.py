"""Loads mixprec's compiled ops (the `mixprec._C` extension, which registers torch.ops.mixprec.*).

Nothing here runs at import: `import mixprec`, the CLI and `mixprec doctor` work without a build.
load(), called by every kernel-backed code path, tries in order: the extension built by `pip
install`; else, in a source checkout, a just-in-time build of csrc/ with ninja into torch's
extension cache; else an ImportError that says what is missing. status() says which of these
applies without building anything (for doctor).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from mixprec import _build

INSTALL_FIX = "pip install --no-build-isolation -e ."


class ExtensionUnavailable(ImportError):
    """The compiled extension is neither installed nor buildable here; the message says why."""


def _jit_build(first_error: ImportError) -> ModuleType:
    missing = _build.missing_for_cpu_build()
    if missing:
        raise ExtensionUnavailable(
            "mixprec's compiled extension (mixprec._C) is not built and cannot be built here; "
            "missing: " + "; ".join(missing) + f". Or install a built package: {INSTALL_FIX}"
        ) from first_error
    import torch

    cuda_home = _build.find_cuda_home()
    gpu = torch.cuda.is_available()
    with_cuda = _build.build_cuda(torch.version.cuda, cuda_home, gpu_present=gpu)
    if with_cuda:
        _build.prepare_cuda_env(cuda_home, gpu)
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name="mixprec_C_cuda" if with_cuda else "mixprec_C_cpu",
        sources=[str(s) for s in _build.sources(with_cuda)],
        extra_include_paths=[str(p) for p in _build.INCLUDE_DIRS],
        extra_cflags=_build.CXX_FLAGS,
        extra_cuda_cflags=_build.NVCC_FLAGS,
        with_cuda=with_cuda,
        is_python_module=True,  # the module's functions drive autocast; loading it registers the ops
    )


_module: ModuleType | None = None


def load() -> ModuleType:
    """Make torch.ops.mixprec.* (and their fake kernels) available, building the extension if
    needed; returns the module (its functions drive mixprec.autocast)."""
    global _module
    if _module is not None:
        return _module
    try:
        from mixprec import _C as module
    except ImportError as err:
        if not _build.CSRC.is_dir():
            raise ExtensionUnavailable(
                "mixprec's compiled extension (mixprec._C) is missing from this installation and "
                "there is no csrc/ to build it from; reinstall: pip install --no-build-isolation mixprec"
            ) from err
        module = _jit_build(err)
    _module = module
    from mixprec import ops

    ops.register_fake_kernels()  # for torch.compile and opcheck, as soon as the ops exist
    return module


def loaded() -> bool:
    return _module is not None


@dataclass(frozen=True)
class BuildStatus:
    """state: "loaded", "built" (importable, not loaded yet), "not built" or "broken";
    detail: why, for the last two; fix: what to run, or "" when nothing is needed."""

    state: str
    detail: str = ""
    fix: str = ""


def status() -> BuildStatus:
    """What load() would find, without loading or building anything new (a built extension is
    imported: that is how to know it works)."""
    if _module is not None:
        return BuildStatus("loaded")
    if importlib.util.find_spec("mixprec._C") is None:
        if not _build.CSRC.is_dir():
            return BuildStatus("not built", "mixprec._C is missing from this installation and there "
                               "is no csrc/ to build it from",
                               "pip install --force-reinstall --no-build-isolation mixprec")
        missing = _build.missing_for_cpu_build()
        if missing:
            return BuildStatus("not built", "missing: " + "; ".join(missing),
                               f"install what is missing, then: {INSTALL_FIX}")
        return BuildStatus("not built", "the first use compiles csrc/ just in time (minutes; cached in "
                           "torch's extension directory)", f"build it now: {INSTALL_FIX}")
    try:  # the built module itself, not load(): a broken build must not start a just-in-time one
        importlib.import_module("mixprec._C")
    except (ImportError, OSError, RuntimeError) as err:  # what a stale or partial build raises
        return BuildStatus("broken", f"{type(err).__name__}: {err}",
                           f"rebuild against the installed torch: {INSTALL_FIX}")
    load()
    return BuildStatus("loaded")
