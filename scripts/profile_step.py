"""Where one optimizer step's GPU time goes: the kernels of a bench_optimizer variant under
torch.profiler, with their total time per step and the gaps between them. Run on the GPU machine:
  python -m scripts.profile_step --model 124M --variant ours-fp32-fast-norm"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_optimizer import MODELS, make_variant
from benchmarks.harness import gpt2_shapes


def kernel_table(fn, calls: int) -> None:
    """Runs fn 3 times, then `calls` times under torch.profiler, and prints each CUDA kernel's
    time per call, its launches per call, and the span, busy time and gaps per call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    totals: dict[str, list[float]] = {}
    for e in events:
        totals.setdefault(e.name[:100], []).append(e.time_range.elapsed_us())
    for name, ts in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        print(f"{sum(ts) / calls:9.1f} us/call  x{len(ts) / calls:4.1f}  {name}")
    span = (events[-1].time_range.end - events[0].time_range.start) / calls
    busy = sum(e.time_range.elapsed_us() for e in events) / calls
    print(f"span {span:.1f} us/call, kernels busy {busy:.1f} us/call, gaps {span - busy:.1f} us/call\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="124M")
    ap.add_argument("--variant", default="ours-fp32-fast-norm")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    call, note, _ = make_variant(a.variant, gpt2_shapes(*MODELS[a.model]), "cuda")
    print(a.model, a.variant, note, "(a call is one step)")
    kernel_table(call, a.steps)


if __name__ == "__main__":
    main()
