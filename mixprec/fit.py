"""`mixprec bench --fit`: the largest model whose full training step fits on this device, per
precision and optimizer-state mode, beside torch.amp bf16-mixed + torch AdamW(fused).

A model family fixes every shape but the depth (GPT: d=4096, 32 heads, vocab 32768, bias-free,
micro-batch 1 x 1024 tokens; ViT: ViT-L/16's width at 224 x 224, batch 1), and a probe builds the
model at one depth directly in its storage dtype on the device (never in fp32 first) and runs two
training steps (the first creates the optimizer state), in a fresh process each, so that an
out-of-memory error cannot poison the next probe. The search: two small probes give the bytes per
layer and the fixed bytes, which predict the largest depth; probes around it bracket the answer
(fits at D, not at D + 1). On the CPU, or with `memory_limit`, a probe fits when its measured peak
is under the limit (for tests and dry runs).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = {
    # name: (builder kwargs, tiny kwargs for CPU dry runs)
    "gpt": ({"vocab": 32768, "ctx": 1024, "d": 4096, "heads": 32}, {"vocab": 256, "ctx": 32, "d": 64, "heads": 4}),
    "vit": ({"image": 224, "patch": 16, "d": 1024, "heads": 16}, {"image": 32, "patch": 8, "d": 64, "heads": 4}),
}

# Each mode: the weights' dtype, how the step runs, and mixprec.optim.AdamW's options (None: torch's).
MODES: dict[str, dict[str, Any]] = {
    "torch-bf16-mixed": {"dtype": torch.float32, "autocast": True, "options": None,
                         "label": "torch.amp bf16-mixed + torch AdamW(fused)"},
    "bf16-true": {"dtype": torch.bfloat16, "options": {}, "label": "mixprec bf16-true, fp32 master + moments"},
    "bf16-true-stochastic": {"dtype": torch.bfloat16, "options": {"master_weights": False, "rounding": "stochastic"},
                             "label": "mixprec bf16-true, stochastic rounding, fp32 moments"},
    "bf16-true-remainder-8bit": {"dtype": torch.bfloat16, "options": {"master_weights": "remainder", "moments": "8bit"},
                                 "label": "mixprec bf16-true, remainder + 8-bit moments"},
    "bf16-true-remainder-8bit-in-backward": {
        "dtype": torch.bfloat16, "options": {"master_weights": "remainder", "moments": "8bit"}, "in_backward": True,
        "label": "mixprec bf16-true, remainder + 8-bit moments, step in backward"},
    "bf16-true-stochastic-8bit-in-backward": {
        "dtype": torch.bfloat16, "options": {"master_weights": False, "rounding": "stochastic", "moments": "8bit"},
        "in_backward": True, "label": "mixprec bf16-true, stochastic + 8-bit moments, step in backward"},
    "bf16-true-remainder-fp8-in-backward": {
        "dtype": torch.bfloat16, "options": {"master_weights": "remainder", "moments": "fp8"}, "in_backward": True,
        "label": "mixprec bf16-true, remainder + fp8 moments, step in backward"},
}
ANCHOR = "torch-bf16-mixed"


def build(family: str, depth: int, device: torch.device, dtype: torch.dtype, tiny: bool) -> tuple[nn.Module, Any]:
    """The family's model at `depth`, made on `device` in `dtype`, and a function giving a batch."""
    from mixprec.models import GPT, ViT

    shape = FAMILIES[family][1 if tiny else 0]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if family == "gpt":
                model = GPT(shape["vocab"], shape["ctx"], depth, shape["d"], shape["heads"], bias=False)
                tokens = torch.randint(0, shape["vocab"], (1, shape["ctx"] + 1), device=device)
                return model, lambda: (tokens[:, :-1], tokens[:, 1:])
            model = ViT(shape["image"], shape["patch"], depth, shape["d"], shape["heads"])
            images = torch.randn(1, 3, shape["image"], shape["image"], device=device, dtype=dtype)
            labels = torch.zeros(1, dtype=torch.long, device=device)
            return model, lambda: (images, labels)
    finally:
        torch.set_default_dtype(default)


def probe(family: str, mode: str, depth: int, device: str, tiny: bool = False) -> dict[str, Any]:
    """Build and run two training steps at `depth`; returns params and peak bytes (raises on OOM)."""
    from mixprec import optim
    from mixprec.bench import peak_memory

    spec, dev = MODES[mode], torch.device(device)
    with peak_memory(dev) as peak:
        model, batch = build(family, depth, dev, spec["dtype"], tiny)
        if spec["options"] is None:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
        else:
            opt = optim.AdamW(model.parameters(), lr=1e-4, **spec["options"])
        remove = optim.step_in_backward(opt) if spec.get("in_backward") else None
        for _ in range(2):
            x, y = batch()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=spec.get("autocast", False)):
                out = model(x)
            loss = F.cross_entropy(out.float().flatten(0, -2), y.flatten())
            loss.backward()
            if remove is None:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {"params": sum(p.numel() for p in model.parameters()), "peak_bytes": peak.bytes, "depth": depth}


def _probe_in_process(family: str, mode: str, depth: int, device: str, tiny: bool) -> dict[str, Any] | None:
    """One probe in a fresh Python process: its result, or None when it ran out of memory."""
    cmd = [sys.executable, "-m", "mixprec.fit", family, mode, str(depth), device] + (["--tiny"] if tiny else [])
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    if "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr:
        return None
    raise RuntimeError(f"probe {mode} depth {depth} failed:\n{done.stderr[-2000:]}")


@dataclass
class FitResult:
    mode: str
    depth: int
    params: int
    peak_bytes: int | None
    probes: int


def find_largest(family: str, mode: str, device: str, *, tiny: bool = False, memory_limit: int | None = None,
                 progress: Any = None) -> FitResult:
    """The largest depth of `family` whose training step fits (see the module docstring)."""
    probes = 0

    def fits(depth: int) -> dict[str, Any] | None:
        nonlocal probes
        probes += 1
        result = _probe_in_process(family, mode, depth, device, tiny)
        if progress is not None:
            progress(f"{mode}: depth {depth} {'fits' if result else 'out of memory'}")
        if result is not None and memory_limit is not None and (result["peak_bytes"] or 0) > memory_limit:
            return None
        return result

    limit = memory_limit
    if limit is None:
        limit = torch.cuda.mem_get_info(device)[0] if device.startswith("cuda") else 8 << 30
    small = [fits(d) for d in (1, 3)]
    if small[0] is None:
        return FitResult(mode, 0, 0, None, probes)
    if small[1] is None:
        best = small[0]
    else:
        per_layer = (small[1]["peak_bytes"] - small[0]["peak_bytes"]) / 2
        fixed = small[0]["peak_bytes"] - per_layer
        guess = max(3, int((limit - fixed) / per_layer)) if per_layer > 0 else 3
        best, lo, hi = small[1], 3, None  # lo fits; hi (if known) does not
        result = fits(guess)
        if result is None:
            hi = guess
        else:
            best, lo = result, guess
        step = 2
        while hi is None:  # grow until out of memory
            nxt = lo + step
            result = fits(nxt)
            if result is None:
                hi = nxt
            else:
                best, lo, step = result, nxt, step * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            result = fits(mid)
            if result is None:
                hi = mid
            else:
                best, lo = result, mid
    return FitResult(mode, best["depth"], best["params"], best["peak_bytes"], probes)


def run_fit(family: str = "gpt", modes: list[str] | None = None, device: str | None = None, *,
            tiny: bool = False, memory_limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    from mixprec.bench import Progress

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    modes = list(modes or MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown fit mode(s) {unknown}; choose from {list(MODES)}")
    bar = Progress(len(modes) * 6, enabled=progress)
    rows = []
    for mode in modes:
        rows.append(find_largest(family, mode, device, tiny=tiny, memory_limit=memory_limit,
                                 progress=lambda text: bar.advance(1, text)))
    anchor = next((r for r in rows if r.mode == ANCHOR), None)
    out = []
    for r in rows:
        out.append({"mode": r.mode, "depth": r.depth, "params": r.params, "peak_bytes": r.peak_bytes,
                    "probes": r.probes,
                    "x_anchor_params": r.params / anchor.params if anchor and anchor.params else None})
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"family": family, "device": name, "torch": torch.__version__, "tiny": tiny, "rows": out}


def format_fit(result: dict[str, Any]) -> str:
    lines = [f"# largest {result['family']} whose training step fits, {result['device']}, torch {result['torch']}"
             + (" (tiny shapes)" if result["tiny"] else ""),
             f"{'mode':<52} {'depth':>5} {'params':>10} {'peak':>10} {'x ' + ANCHOR:>24}"]
    for r in result["rows"]:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f} GiB"
        ratio = "-" if r["x_anchor_params"] is None else f"{r['x_anchor_params']:.2f}"
        lines.append(f"{r['mode']:<52} {r['depth']:>5} {_fmt_params(r['params']):>10} {peak:>10} {ratio:>24}")
    return "\n".join(lines)


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def write_plot(result: dict[str, Any], path: str) -> None:
    from mixprec.bench import require_matplotlib

    plt = require_matplotlib()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.5))
    ax.barh([r["mode"] for r in rows], [r["params"] / 1e9 for r in rows])
    ax.set_xlabel("parameters (billions) whose training step fits")
    ax.set_title(f"{result['family']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":  # one probe: python -m mixprec.fit FAMILY MODE DEPTH DEVICE [--tiny]
    args = sys.argv[1:]
    tiny = "--tiny" in args
    family_arg, mode_arg, depth_arg, device_arg = [a for a in args if a != "--tiny"]
    print(json.dumps(probe(family_arg, mode_arg, int(depth_arg), device_arg, tiny)))
