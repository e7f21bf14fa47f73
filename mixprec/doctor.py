"""`mixprec doctor`: what this machine supports for mixed precision, whether mixprec's kernels
are built (and if not, what is missing and the fix), and the precision to use here, with the
reason. Needs no build: it reports a missing or broken one instead of failing."""
from __future__ import annotations

import torch

from mixprec import _extension, hardware


def kernels_built() -> dict[str, bool]:
    """Whether every mixprec op (as the dispatcher lists them) has a kernel for each backend;
    loads the extension."""
    from mixprec import ops

    return {key: not ops.ops_without_kernel(key) for key in ("CPU", "CUDA")}


def _kernel_lines() -> list[tuple[str, str]]:
    status = _extension.status()
    if status.state != "loaded":
        return [("mixprec kernels", f"{status.state} — {status.detail}"), ("fix", status.fix)]
    from mixprec import ops

    lines = [("mixprec ops", str(len(ops.op_names())))]
    for key, absent in (("CPU", "missing"), ("CUDA", "not built")):
        lacking = [n.partition("::")[2] for n in ops.ops_without_kernel(key)]
        if not lacking:
            value = "built"
        elif len(lacking) == len(ops.op_names()):
            value = absent
        else:
            value = "missing for " + ", ".join(lacking)
        lines.append((f"mixprec {key} kernels", value))
    return lines


def report() -> list[tuple[str, str]]:
    """The lines `mixprec doctor` prints, as (label, value)."""
    facts = hardware.device_facts()
    precision, reason = hardware.recommended_precision(facts)
    lines = [("torch", torch.__version__), ("CUDA (torch build)", str(torch.version.cuda))]
    if facts.kind == "cuda":
        lines += [("GPU", facts.name),
                  ("compute capability", facts.capability_str),
                  ("tensor cores", "yes" if facts.tensor_cores else "no"),
                  ("bf16 tensor cores", "yes" if facts.bf16 else "no"),
                  ("fp8 tensor cores", "yes" if facts.fp8 else "no")]
    else:
        lines += [("GPU", "none (CPU only)")]
    lines += _kernel_lines()
    lines += [("recommended precision", precision), ("why", reason)]
    return lines


def main() -> None:
    lines = report()
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label:>{width}}: {value}")
