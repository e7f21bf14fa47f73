"""Bandwidth of mixprec's non_finite_check_and_unscale_ vs torch._amp_foreach_non_finite_check_and_unscale_
on GPT-2 sized gradient lists, with a dst.copy_(src) reference timed in the same interleaved rounds.
inv_scale alternates 0.5 / 2.0 between consecutive calls of each implementation, so values stay finite
and every call really writes. Example: python -m benchmarks.bench_unscale --device cpu --repeats 3"""
from __future__ import annotations

import argparse
import gc
import sys

import torch

import mixprec
from benchmarks.harness import (
    JSON_HELP,
    copy_fn,
    emit,
    gpt2_shapes,
    results_path,
    summarize,
    time_interleaved,
)
from mixprec import ops

MODELS = {"124M": (12, 768), "1.5B": (48, 1600)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = ["model", "dtype", "n_tensors", "ours_ms", "ours_gbps", "torch_ms", "torch_gbps", "copy_gbps",
           "ours_pct_of_copy", "speedup_vs_torch", "ours_spread", "torch_spread", "copy_spread"]


def alternating(op, grads: list[torch.Tensor], found_inf: torch.Tensor, scales: list[torch.Tensor]):
    """A zero-argument call of op(grads, found_inf, inv_scale) whose inv_scale alternates over `scales`."""
    state = {"i": 0}

    def call() -> None:
        op(grads, found_inf, scales[state["i"] % len(scales)])
        state["i"] += 1
    return call


def bench_one(model: str, dtype: str, device: str, repeats: int, copy, copy_bytes: int) -> dict:
    """Time ours, torch's (if it accepts this dtype on this device) and the copy reference, interleaved."""
    shapes = gpt2_shapes(*MODELS[model])
    torch.manual_seed(0)
    grads = [torch.randn(s, device=device).to(DTYPES[dtype]) for s in shapes]
    n_elem = sum(g.numel() for g in grads)
    moved = 2 * sum(g.numel() * g.element_size() for g in grads)   # read + write
    scales = [torch.tensor(0.5, device=device), torch.tensor(2.0, device=device)]
    inf_ours = torch.zeros((), device=device)
    inf_torch = torch.zeros((), device=device)

    fns = {"ours": alternating(ops.non_finite_check_and_unscale_, grads, inf_ours, scales)}
    torch_status = "ok"
    try:  # e.g. CUDA bf16 is refused by torch
        torch._amp_foreach_non_finite_check_and_unscale_(grads, inf_torch, torch.ones((), device=device))
        fns["torch"] = alternating(torch._amp_foreach_non_finite_check_and_unscale_, grads, inf_torch, scales)
    except RuntimeError as e:
        torch_status = "unsupported"
        print(f"# torch unscale {model} {dtype} on {device}: unsupported ({str(e).splitlines()[0]})",
              file=sys.stderr)
    fns["copy"] = copy

    stats = {k: summarize(v) for k, v in time_interleaved(fns, repeats, device).items()}
    if inf_ours.item() != 0 or inf_torch.item() != 0:
        print(f"# WARNING {model} {dtype}: found_inf set on finite data "
              f"(ours={inf_ours.item()}, torch={inf_torch.item()})", file=sys.stderr)

    ours_ms = stats["ours"]["median"]
    ours_gbps = moved / ours_ms / 1e6
    copy_gbps = copy_bytes / stats["copy"]["median"] / 1e6
    torch_ms = stats["torch"]["median"] if "torch" in stats else None
    return {
        "model": model, "dtype": dtype, "n_tensors": len(grads), "elements": n_elem, "bytes_moved": moved,
        "ours_ms": ours_ms, "ours_gbps": ours_gbps,
        "torch_ms": torch_ms, "torch_gbps": moved / torch_ms / 1e6 if torch_ms else None,
        "torch_status": torch_status,
        "copy_ms": stats["copy"]["median"], "copy_gbps": copy_gbps,
        "ours_pct_of_copy": 100 * ours_gbps / copy_gbps,
        "speedup_vs_torch": torch_ms / ours_ms if torch_ms else None,
        "ours_spread": stats["ours"]["spread"],
        "torch_spread": stats["torch"]["spread"] if "torch" in stats else None,
        "copy_spread": stats["copy"]["spread"],
        "repeats": repeats, "inv_scale": "alternating 0.5/2.0",
        "device": device, "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "mixprec_version": getattr(mixprec, "__version__", None),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None, help="comma list of 124M,1.5B (default: both on cuda, 124M on cpu)")
    p.add_argument("--dtypes", default="fp32,fp16,bf16")
    p.add_argument("--repeats", type=int, default=None, help="default 20 on cuda, 5 on cpu")
    p.add_argument("--json", default=None, help=JSON_HELP)
    args = p.parse_args()

    assert len(gpt2_shapes(*MODELS["124M"])) == 148 and len(gpt2_shapes(*MODELS["1.5B"])) == 580
    cuda = torch.device(args.device).type == "cuda"
    models = (args.models or ("124M,1.5B" if cuda else "124M")).split(",")
    dtypes = args.dtypes.split(",")
    repeats = args.repeats or (20 if cuda else 5)

    nbytes = (2 << 30) if cuda else (256 << 20)
    copy = copy_fn(args.device, nbytes)   # moves 2 * nbytes per call

    rows = []
    for model in models:
        for dtype in dtypes:
            rows.append(bench_one(model, dtype, args.device, repeats, copy, 2 * nbytes))
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    emit(rows, results_path(args.json, "unscale", args.device), COLUMNS)
    print(f"\n# {rows[0]['device_name']}, torch {torch.__version__}, {repeats} interleaved repeats; "
          "inv_scale alternates 0.5/2.0 between consecutive calls of each implementation; "
          "GB/s = 2 * bytes / median time (read + write)")


if __name__ == "__main__":
    main()
