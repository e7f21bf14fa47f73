"""Where the GPU time of one optimizer step goes: torch.profiler over a few calls of the
GPT-2 124M scale/clip/step/update sequence (mixprec.optim.AdamW), kernels per step in µs.
Usage, from the repository root: python -m scripts.profile_step [bf16-nearest bf16-stochastic ...]
(a variant is a dtype, optionally followed by -rounding for master_weights=False)."""
import sys
from collections import defaultdict

import torch

import mixprec
from benchmarks.harness import gpt2_shapes

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CALLS = 10


def profile(variant: str) -> None:
    dtype_name, _, rounding = variant.partition("-")
    dtype = DTYPES[dtype_name]
    params = [(torch.randn(s, device="cuda", dtype=dtype) * 0.02).requires_grad_()
              for s in gpt2_shapes(12, 768)]
    for q in params:
        q.grad = torch.randn_like(q) * 65.536
    options = {"master_weights": False, "rounding": rounding} if rounding else {}
    opt = mixprec.optim.AdamW(params, lr=3e-4, weight_decay=0.1, **options)
    scaler = mixprec.GradScaler("cuda")
    scaler.scale(torch.ones((), device="cuda"))

    def call():
        scaler.clip_grad_norm_(opt, 1.0)
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            torch.cuda._sleep(4_000_000)
            call()
        torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and "spin_kernel" not in e.name and "sleep" not in e.name:
            per_kernel[e.name][0] += 1
            per_kernel[e.name][1] += e.device_time
    print(f"\n## {variant}: kernels per step (count, µs)")
    total = 0.0
    for name, (count, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1]):
        total += us / CALLS
        print(f"{count / CALLS:5.1f} {us / CALLS:9.1f}  {name[:110]}")
    print(f"      {total:9.1f}  total kernel time per step")
    # Wall GPU time per step (kernels + gaps), events around a sleep-held call.
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(4_000_000)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    print(f"      {times[len(times) // 2]:9.1f}  event time per step (median of 20)")


for v in sys.argv[1:] or ["bf16-nearest"]:
    profile(v)
    torch.cuda.empty_cache()
