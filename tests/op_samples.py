"""Sample arguments for every op of the mixprec namespace, in one place: tests/test_op_registry.py
runs torch.library.opcheck and the version-bump check on each, and fails for an op the dispatcher
lists without an entry here. A new op adds its entry; a schema change edits it here only.

Each entry maps the op's name to a function of the device returning a list of samples: a tuple
of positional arguments in schema order, or (that tuple, a dict of keyword-only arguments). Keep tensors small: opcheck runs each sample several times (eager, fake,
autograd registration, AOT dispatch).
"""
import math

import torch


def _tensors(device):
    p = [torch.randn(37, device=device), torch.randn(4, 5, device=device)]
    return p, [torch.randn_like(t) for t in p]


def _scalar(value, device):
    return torch.full((), value, device=device)


def _unscale(device):
    grads = [torch.randn(100, device=device), torch.randn(33, device=device).half(),
             torch.randn(7, 5, device=device).bfloat16()]
    return [(grads, _scalar(0.0, device), _scalar(0.5, device))]


def _update_scale(device):
    return [(_scalar(8.0, device), torch.zeros((), dtype=torch.int32, device=device),
             torch.ones((), dtype=torch.int32, device=device), torch.zeros(2, dtype=torch.int64, device=device),
             _scalar(1.0, device), 2.0, 0.5, 3, 1, 0.0, math.inf)]


def _grad_norm(device):
    _, g = _tensors(device)
    return [(g, _scalar(0.0, device), _scalar(0.5, device), 2.0),
            ([g[0].half(), g[1].bfloat16()], _scalar(0.0, device), _scalar(1.0, device), math.inf)]


def _clip_coef(device):
    return [(_scalar(3.0, device), 1.0)]


def _clip_grad_norm_scaled(device):
    grads = [torch.randn(100, device=device), torch.randn(7, device=device).half()]
    return [(grads, _scalar(8.0, device), 2.0, 1.0)]


def _adam_step(device):
    p, g = _tensors(device)
    state = lambda: [torch.rand_like(t) for t in p]
    steps = [_scalar(3.0, device) for _ in p]
    half, bf16 = [t.half() for t in p], [t.bfloat16() for t in p]
    return [
        # fp32, AdamW, every optional scalar given
        ((p, g, state(), state(), state(), [], [], steps, 1e-3, None, 0.9, 0.999, 1e-8, 0.01, True, False,
          _scalar(0.5, device), _scalar(0.9, device), _scalar(0.0, device)), {"rounding": "nearest", "seed": 0}),
        # fp16 with fp32 master weights, lr on the device
        ((half, [t.half() for t in g], state(), state(), [], [t.float() for t in half], [], steps, 0.0,
         _scalar(1e-3, device), 0.9, 0.999, 1e-8, 0.0, False, True, None, None, None), {"rounding": "nearest", "seed": 0}),
        # bf16 without master weights, Kahan-compensated
        ((bf16, [t.bfloat16() for t in g], state(), state(), [], [], [torch.zeros_like(t) for t in bf16], steps,
         1e-3, None, 0.9, 0.999, 1e-8, 0.1, True, False, None, None, None), {"rounding": "kahan", "seed": 0}),
    ]


def _sgd_step(device):
    p, g = _tensors(device)
    steps = [_scalar(3.0, device) for _ in p]
    bf16 = [t.bfloat16() for t in p]
    return [
        ((p, g, [torch.rand_like(t) for t in p], [], [], steps, 0.1, None, 0.9, 0.0, 0.0, True, False, None, None,
         _scalar(0.0, device)), {"rounding": "nearest", "seed": 0}),
        ((bf16, [t.bfloat16() for t in g], [], [], [], steps, 0.1, None, 0.0, 0.0, 0.0, False, False, None, None,
         None), {"rounding": "stochastic", "seed": 1234}),
    ]


def _maps(device):
    from mixprec import quant
    return quant.signed_map(device), quant.unsigned_map(device)


def _adam_step_compressed(device):
    p = [torch.randn(300, device=device).bfloat16(), torch.randn(4, 5, device=device).bfloat16()]
    g = [torch.randn_like(t) for t in p]
    steps = [_scalar(3.0, device) for _ in p]
    codes = lambda: [torch.randint(0, 256, t.shape, dtype=torch.uint8, device=device) for t in p]
    absmax = lambda: [torch.rand((t.numel() + 255) // 256, device=device) for t in p]
    remainders = [torch.randint(-1000, 1000, t.shape, dtype=torch.int16, device=device) for t in p]
    fp32 = lambda: [torch.rand(t.shape, device=device) for t in p]
    bf16 = lambda: [torch.rand(t.shape, device=device).bfloat16() for t in p]
    fp8 = lambda: [torch.rand(t.shape, device=device).to(torch.float8_e4m3fn) for t in p]
    sm, um = _maps(device)
    tail = (_scalar(0.5, device), _scalar(0.9, device), _scalar(0.0, device), sm, um)
    return [
        # 8-bit moments, remainder master, every optional scalar given
        ((p, g, codes(), codes(), absmax(), absmax(), [], remainders, steps, 1e-3, None, 0.9, 0.999, 1e-8,
          0.01, True, False) + tail, {"moments": "8bit", "weights": "remainder", "seed": 3}),
        # bf16 moments, stochastic weights, lr on the device
        ((p, g, bf16(), bf16(), [], [], [], [], steps, 0.0, _scalar(1e-3, device), 0.9, 0.999, 1e-8, 0.0,
          False, True, None, None, None, sm, um), {"moments": "bf16", "weights": "stochastic", "store_grads": True}),
        # fp32 moments with the remainder
        ((p, g, fp32(), fp32(), [], [], [], remainders, steps, 1e-3, None, 0.9, 0.999, 1e-8, 0.01, True,
          False, None, None, None, sm, um), {"moments": "fp32", "weights": "remainder"}),
        # fp8 moments, plain weights
        ((p, g, fp8(), fp8(), absmax(), absmax(), [], [], steps, 1e-3, None, 0.9, 0.999, 1e-8, 0.01, True,
          False, None, None, None, sm, um), {"moments": "fp8", "weights": "plain"}),
    ]


def _quantize_blockwise(device):
    return [(torch.randn(700, device=device), _maps(device)[0]), (torch.rand(3, 5, device=device), _maps(device)[1])]


def _dequantize_blockwise(device):
    return [(torch.randint(0, 256, (700,), dtype=torch.uint8, device=device), torch.rand(3, device=device),
             _maps(device)[0])]


def _fp8_amax(device):
    return [(torch.randn(70, 33, device=device),), (torch.randn(5, device=device, dtype=torch.bfloat16),)]


def _fp8_cast(device):
    x = torch.randn(70, 36, device=device, dtype=torch.bfloat16)
    amax = x.float().abs().amax()
    return [(x, amax, torch.float8_e4m3fn), ((x.float(), amax, torch.float8_e5m2), {"transpose": True}),
            ((x, amax, torch.float8_e4m3fn), {"shrink": 0.5, "transpose": True})]


def _fp8_cast_delayed(device):
    x = torch.randn(70, 36, device=device, dtype=torch.bfloat16)
    history = torch.tensor([2.0, 0.5, 4.0], device=device)
    overflows = torch.zeros((), dtype=torch.int64, device=device)
    return [(x, history, overflows, torch.float8_e4m3fn),
            ((x.float(), history, overflows, torch.float8_e5m2), {"reduce": "most_recent", "transpose": True})]


SAMPLES = {
    "fp8_amax": _fp8_amax,
    "fp8_cast": _fp8_cast,
    "fp8_cast_delayed": _fp8_cast_delayed,
    "adam_step_compressed_": _adam_step_compressed,
    "quantize_blockwise": _quantize_blockwise,
    "dequantize_blockwise": _dequantize_blockwise,
    "non_finite_check_and_unscale_": _unscale,
    "update_scale_": _update_scale,
    "grad_norm": _grad_norm,
    "clip_coef": _clip_coef,
    "clip_grad_norm_scaled": _clip_grad_norm_scaled,
    "adam_step_": _adam_step,
    "sgd_step_": _sgd_step,
}
