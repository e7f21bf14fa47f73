"""What an in-place pass can reach on this GPU, beside the copy reference: dst.copy_(src),
torch's in-place x.mul_(s), and mixprec's unscale, on one large buffer and on the GPT-2 124M
list, interleaved (CUDA events, medians). --ncu: one call of each, for a profiler run.
Example: python -m scripts.probe_bandwidth --mib 1024 --repeats 20"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import gpt2_shapes, summarize, time_interleaved
from mixprec import ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ncu", action="store_true", help="one call each (for ncu), no timing")
    args = ap.parse_args()
    dev = "cuda"
    n = args.mib * 2**20 // 4
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    found = torch.zeros((), device=dev)
    grads = [torch.randn(sh, device=dev) for sh in gpt2_shapes(12, 768)]
    list_bytes = 2 * sum(g.numel() * 4 for g in grads)
    la = torch.empty(list_bytes // 8, device=dev)
    lb = torch.empty_like(la)
    scales = [torch.tensor(0.5, device=dev), torch.tensor(2.0, device=dev)]
    state = {"i": 0}

    def flip() -> torch.Tensor:
        state["i"] += 1
        return scales[state["i"] % 2]

    fns = {
        "copy_1g": lambda: b.copy_(a),
        "mul_inplace_1g": lambda: a.mul_(flip()),
        "ours_unscale_1g": lambda: ops.non_finite_check_and_unscale_([a], found, flip()),
        "copy_list": lambda: lb.copy_(la),
        "ours_unscale_list": lambda: ops.non_finite_check_and_unscale_(grads, found, flip()),
        "torch_unscale_list": lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, flip()),
    }
    if args.ncu:
        for fn in fns.values():
            fn()
        import mixprec.optim  # and one fused AdamW step (fp32 and bf16 + master) over the 124M list
        for dtype in (torch.float32, torch.bfloat16):
            params = [torch.nn.Parameter(g.to(dtype)) for g in grads]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = mixprec.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
            opt.step()
            opt.step()
        torch.cuda.synchronize()
        return
    samples = time_interleaved(fns, args.repeats, dev)
    nbytes = {"copy_1g": 2 * a.numel() * 4, "mul_inplace_1g": 2 * a.numel() * 4,
              "ours_unscale_1g": 2 * a.numel() * 4, "copy_list": list_bytes,
              "ours_unscale_list": list_bytes, "torch_unscale_list": list_bytes}
    for name, t in samples.items():
        st = summarize(t)
        print(f"{name:22s} {st['median']:8.3f} ms  {nbytes[name] / st['median'] / 1e6:8.1f} GB/s  spread {st['spread']:.3f}")


if __name__ == "__main__":
    main()
