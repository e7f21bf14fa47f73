"""Where one optimizer step's GPU time goes: the kernels of a bench_optimizer variant under
torch.profiler, with their total time per step and the gaps between them. Run on the GPU machine:
  python -m scripts.profile_step --model 124M --variant ours-fp32-fast-norm"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_optimizer import MODELS, make_variant
from benchmarks.harness import gpt2_shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="124M")
    ap.add_argument("--variant", default="ours-fp32-fast-norm")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    call, note, _ = make_variant(a.variant, gpt2_shapes(*MODELS[a.model]), "cuda")
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            call()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    print(a.model, a.variant, note)
    totals: dict[str, list[float]] = {}
    for e in events:
        totals.setdefault(e.name[:90], []).append(e.time_range.elapsed_us())
    for name, ts in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        print(f"{sum(ts) / a.steps:9.1f} us/step  x{len(ts) / a.steps:4.1f}  {name}")
    span = (events[-1].time_range.end - events[0].time_range.start) / a.steps
    busy = sum(e.time_range.elapsed_us() for e in events) / a.steps
    print(f"span {span:.1f} us/step, kernels busy {busy:.1f} us/step, gaps {span - busy:.1f} us/step")


if __name__ == "__main__":
    main()
