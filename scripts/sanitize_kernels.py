"""Drives every CUDA kernel over the awkward cases (sizes around chunk and vector edges,
misaligned views, strided views, mixed dtypes, empty tensors) for compute-sanitizer memcheck."""
import math

import torch

import mixprec
from mixprec import ops

dev = "cuda"
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    for n in (0, 1, 3, 7, 8, 9, 17, 8191, 8193, 16385, 32769, 100_003):
        base = torch.randn(n + 1, device=dev).to(dtype)
        grads = [base[:n], base[1:], torch.randn(n, 3, device=dev).to(dtype).t(),
                 torch.randn(2 * n + 1, device=dev).to(dtype)[::2]]
        grads[0][-1:] = float("inf")
        for inv in (0.5, 1.0):
            found = torch.zeros((), device=dev)
            ops.non_finite_check_and_unscale_(grads, found, torch.full((), inv, device=dev))
many = [torch.randn(k % 37 + 1, device=dev).half() for k in range(700)]  # several launches
ops.non_finite_check_and_unscale_(many, torch.zeros((), device=dev), torch.full((), 0.5, device=dev))
state = [torch.full((), 4.0, device=dev), torch.zeros((), dtype=torch.int32, device=dev),
         torch.ones((), dtype=torch.int32, device=dev), torch.zeros(2, dtype=torch.int64, device=dev)]
for f in (0.0, 1.0, 0.0):
    ops.update_scale_(*state, torch.full((), f, device=dev), 2.0, 0.5, 1, 1, 0.0, math.inf)
scaler = mixprec.GradScaler("cuda")
model = torch.nn.Linear(64, 64).cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
scaler.scale(model(torch.randn(8, 64, device=dev)).sum()).backward()
scaler.step(opt)
scaler.update()
torch.cuda.synchronize()
print("sanitize_kernels: all kernels ran")
