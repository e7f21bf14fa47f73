"""Where one fp8 linear's forward + backward spends its GPU time, beside bf16: the kernels under
torch.profiler with their time per call. Run on the GPU machine:
  python -m scripts.profile_fp8 --mkn 16384,2048,8192"""
import argparse

import torch
import torch.nn.functional as F

from mixprec import fp8
from scripts.profile_step import kernel_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mkn", default="16384,2048,8192")
    ap.add_argument("--input-dtype", default="bfloat16")
    ap.add_argument("--calls", type=int, default=5)
    a = ap.parse_args()
    m, k, n = (int(v) for v in a.mkn.split(","))
    dtype = getattr(torch, a.input_dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device="cuda") / k**0.5).requires_grad_()
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def bf16():
        F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).backward(g)

    def ours():
        with torch.no_grad():
            w.add_(0.0)  # a new version of the weight, as after an optimizer step
        fp8._Fp8Linear.apply(x, w, torch.bfloat16).backward(g)

    print(f"M, K, N = {m}, {k}, {n}; input {dtype}, weight fp32 (bf16 autocast's case)\n-- bf16")
    kernel_table(bf16, a.calls)
    print("-- mixprec fp8")
    kernel_table(ours, a.calls)


if __name__ == "__main__":
    main()
