"""`python -m mixprec demo`: a short fp16 mixed-precision training run with mixprec.GradScaler and
the fused mixprec.optim.AdamW, on the GPU when there is one, else on the CPU, showing loss, scale
and skipped steps."""
from __future__ import annotations

import sys
import time

import torch

import mixprec

SKIPS_EXPECTED = ("skipped steps are expected: fp16 loss scaling skips a step when the gradients overflow "
                  "at the current scale (in the first steps, while the scale backs off from 65536, and "
                  "whenever it has grown too far) and lowers the scale")


def _progress(step: int, total: int, text: str, width: int = 30) -> None:
    done = width * step // total
    line = f"[{'#' * done}{'.' * (width - done)}] {step:4d}/{total} {text}"
    if sys.stdout.isatty():
        print("\r" + line, end="\n" if step == total else "", flush=True)
    elif step % max(1, total // 10) == 0 or step == total:
        print(line, flush=True)


def run_demo(steps: int = 300, device: str | None = None, seed: int = 0) -> dict:
    """Train a small MLP classifier on synthetic data under fp16 autocast + mixprec.GradScaler +
    mixprec.optim.AdamW, clipping the grad norm inside the fused step.
    A short growth interval makes the scale double until fp16 gradients overflow: those steps
    are skipped on the device and the scale backs off, which is the loop working as intended."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda', but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    torch.manual_seed(seed)
    dim, classes, batch, hidden = 64, 10, 128, 128
    teacher = torch.randn(dim, classes, device=device)
    model = torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
        torch.nn.Linear(hidden, classes),
    ).to(device)
    opt = mixprec.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = mixprec.GradScaler(device, growth_interval=15)
    print(f"mixprec demo: {steps} steps on {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), fp16 autocast + mixprec.GradScaler + mixprec.optim.AdamW")
    print(SKIPS_EXPECTED)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randn(batch, dim, device=device)
        y = (x @ teacher).argmax(dim=1)
        with torch.autocast(device, dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.clip_grad_norm_(opt, 1.0)  # norm + inf check in one read; clipping happens in step
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps:  # reading values synchronises: only now and then
            stats = scaler.stats()
            _progress(step, steps, f"loss {loss.item():.4f}  scale {stats['scale']:.0f}  "
                                   f"skipped {stats['skipped_steps']}")
    stats = scaler.stats()
    result = {"device": device, "steps": steps, "final_loss": float(loss.item()),
              "scale": stats["scale"], "skipped_steps": stats["skipped_steps"],
              "seconds": time.perf_counter() - start}
    print(f"done in {result['seconds']:.1f} s: final loss {result['final_loss']:.4f}, "
          f"scale {result['scale']:.0f}, {result['skipped_steps']} skipped steps"
          + (" (expected, see above)" if result["skipped_steps"] else ""))
    return result
