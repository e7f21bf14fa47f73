"""Launches the kernels we profile with Nsight Compute, a few times each and nothing else, so that
`ncu -k regex:<name>` sees only them. Run on the GPU machine (see gpu_pending.sh's ncu stage):
  ncu --kernel-name-base demangled -k regex:cast_kernel python -m scripts.ncu_kernels fp8
  ncu --kernel-name-base demangled -k regex:CompressedAdam python -m scripts.ncu_kernels compressed"""
import sys

import torch

from mixprec import ops


def fp8_casts() -> None:
    """The casts of one large linear (16384 x 2048 x 8192, bf16 autocast): the fp32 LayerNorm
    output (current scaling), the bf16 output grad (e5m2, delayed scaling), each with its
    transposed copy."""
    x = torch.randn(16384, 2048, device="cuda")
    g = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16)
    history = torch.ones(16, device="cuda")
    overflows = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(2):
        ops.fp8_cast(x, ops.fp8_amax(x), torch.float8_e4m3fn, transpose=True)
        ops.fp8_cast_delayed(g, history, overflows, torch.float8_e5m2, transpose=True)


def compressed_step() -> None:
    """Three steps of the 1.5B GPT-2 list with bf16 weights + remainder + 8-bit moments."""
    from benchmarks.bench_optimizer import MODELS, make_variant
    from benchmarks.harness import gpt2_shapes

    call, _, _ = make_variant("ours-bf16-remainder-8bit-fast-norm", gpt2_shapes(*MODELS["1.5B"]), "cuda")
    for _ in range(3):
        call()


if __name__ == "__main__":
    {"fp8": fp8_casts, "compressed": compressed_step}[sys.argv[1]]()
    torch.cuda.synchronize()
