"""Where the GPU time of one optimizer step goes: torch.profiler over a few calls of the
GPT-2 124M scale/clip/step/update sequence (mixprec.optim.AdamW), kernels sorted by total time.
Usage: python scripts/profile_step.py [--rounding stochastic] [--dtype bf16]"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mixprec  # noqa: E402
from harness import gpt2_shapes  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
p.add_argument("--rounding", default=None)
args = p.parse_args()
dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
params = [(torch.randn(s, device="cuda", dtype=dtype) * 0.02).requires_grad_() for s in gpt2_shapes(12, 768)]
for q in params:
    q.grad = torch.randn_like(q) * 65.536
options = {"master_weights": False, "rounding": args.rounding} if args.rounding else {}
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
    for _ in range(10):
        torch.cuda._sleep(4_000_000)
        call()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
