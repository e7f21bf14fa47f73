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
many = [torch.randn(k % 37 + 1, device=dev).half() for k in range(3000)]  # several launches (tables: kSmallTableBytes / kLargeTableBytes in multi_tensor_apply.cuh)
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

# grad_norm: every norm kind, mixed dtypes, misaligned views, more tensors than one launch holds.
for norm_type in (2.0, 1.0, math.inf, 3.0):
    grads = [torch.randn(n, device=dev).to(dtype)[1:] for n in (2, 9, 8194, 100_003)
             for dtype in (torch.float32, torch.float16, torch.bfloat16)] + many
    norm = ops.grad_norm(grads, torch.zeros((), device=dev), torch.full((), 0.5, device=dev), norm_type)
    ops.clip_coef(norm, 1.0)
    ops.clip_grad_norm_scaled(grads, torch.full((), 4.0, device=dev), norm_type, 1.0)
ops.clip_grad_norm_scaled([torch.empty(0, device=dev)], torch.ones((), device=dev), 2.0, 1.0)
ops.grad_norm([torch.empty(0, device=dev)], torch.zeros((), device=dev), torch.ones((), device=dev), 2.0)

# Fused optimizers: fp32 and master-weight params, aligned and misaligned (offset views), sizes
# around vector and chunk edges, amsgrad, momentum, and enough tensors for several launches.
def tensors(dtype, offset):
    sizes = [1, 3, 4, 5, 4095, 4097, 8193, 100_003] + [k % 29 + 1 for k in range(900)]
    return [torch.randn(n + offset, device=dev).to(dtype)[offset:] for n in sizes]

for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for offset in (0, 1):
        params = tensors(dtype, offset)
        grads = [torch.randn_like(p) for p in params]
        def fp32(params=params):  # fresh fp32 state buffers for each call
            return [torch.zeros_like(p, dtype=torch.float32) for p in params]

        masters = [p.float() for p in params] if dtype != torch.float32 else []
        steps = [torch.zeros((), device=dev) for _ in params]
        if dtype != torch.float32:  # no master weights: stochastic and Kahan rounding
            comps = [torch.zeros_like(p) for p in params]
            ops.adam_step_(params, grads, fp32(), fp32(), [], [], steps, lr=1e-3, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True, maximize=False,
                           rounding="stochastic", seed=7, inv_scale=torch.full((), 0.5, device=dev),
                           store_grads=True)
            ops.adam_step_(params, grads, fp32(), fp32(), [], [], steps, lr=1e-3, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True, maximize=False)
            ops.adam_step_(params, grads, fp32(), fp32(), [], [], steps, lr=1e-3, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True, maximize=False,
                           compensations=comps, rounding="kahan")
            ops.sgd_step_(params, grads, [], [], steps, lr=0.1, momentum=0.0, dampening=0.0,
                          weight_decay=0.0, nesterov=False, maximize=False, compensations=comps,
                          rounding="kahan")
            ops.sgd_step_(params, grads, fp32(), [], steps, lr=0.1, momentum=0.9, dampening=0.0,
                          weight_decay=0.0, nesterov=False, maximize=False, rounding="stochastic", seed=3)
        ops.adam_step_(params, grads, fp32(), fp32(), [], masters, steps, lr=1e-3, beta1=0.9,
                       beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                       maximize=True, clip_coef=torch.full((), 0.9, device=dev), store_grads=True)
        for found in (0.0, 1.0):
            ops.adam_step_(params, grads, fp32(), fp32(), fp32(), masters, steps, lr=1e-3, beta1=0.9,
                           beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                           maximize=False, inv_scale=torch.full((), 0.5, device=dev),
                           clip_coef=torch.full((), 0.9, device=dev),
                           found_inf=torch.full((), found, device=dev), store_grads=True)
            ops.sgd_step_(params, grads, fp32(), masters, steps, lr=0.1, momentum=0.9, dampening=0.0,
                          weight_decay=0.01, nesterov=True, maximize=True,
                          found_inf=torch.full((), found, device=dev), store_grads=True)
            ops.sgd_step_(params, grads, [], masters, [], lr=0.1, momentum=0.0, dampening=0.0,
                          weight_decay=0.0, nesterov=False, maximize=False)
model = torch.nn.Linear(64, 64).cuda().half()
opt = mixprec.optim.AdamW(model.parameters())
scaler.scale(model(torch.randn(8, 64, device=dev).half()).float().sum()).backward()
scaler.clip_grad_norm_(opt, 1.0)
scaler.step(opt)
scaler.update()
torch.cuda.synchronize()
# Compressed state: every mode over sizes around quant-block and chunk edges, misaligned views,
# and the block-wise quantize/dequantize ops.
from mixprec import optim, quant

for moments, options in (("8bit", {"master_weights": "remainder"}), ("bf16", {"master_weights": True}),
                         ("8bit", {"master_weights": False, "rounding": "stochastic"}),
                         ("fp32", {"master_weights": "remainder"}), ("8bit", {"dtype": torch.float32}),
                         ("fp8", {"master_weights": "remainder"}), ("fp8", {"dtype": torch.float32})):
    dtype = options.pop("dtype", torch.bfloat16)
    for offset in (0, 1):
        params = [torch.nn.Parameter(t) for t in tensors(dtype, offset)[:40]]
        opt = optim.AdamW(params, moments=moments, **options)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
for n in (0, 1, 255, 256, 257, 100_003):
    codes, absmax = quant.quantize(torch.randn(n, device=dev), signed=True)
    quant.dequantize(codes, absmax, signed=True)
# fp8 casts: shapes around the 64 x 64 tile and the 4-byte packed stores, every input dtype, with
# and without the transposed copy, current and delayed scaling.
from mixprec import ops

for rows, cols in ((1, 1), (3, 5), (64, 64), (65, 63), (130, 4), (4, 130), (1000, 17)):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(rows, cols, device=dev).to(dtype)
        ops.fp8_cast(x, ops.fp8_amax(x), torch.float8_e4m3fn, transpose=True)
        ops.fp8_cast_delayed(x, torch.ones(3, device=dev), torch.zeros((), dtype=torch.int64, device=dev),
                             torch.float8_e5m2, transpose=True)
        ops.fp8_cast(x, ops.fp8_amax(x), torch.float8_e5m2)
ops.fp8_cast(torch.empty(0, 8, device=dev), torch.ones((), device=dev), torch.float8_e4m3fn, transpose=True)
torch.cuda.synchronize()
print("sanitize_kernels: all kernels ran")
