"""Small shared helpers for the benchmarks: model shapes, an interleaved timer, summaries and output.

The benchmarks are modules of the `benchmarks` package; run them from the repository root as
`python -m benchmarks.bench_unscale` (and so on), which is what lets them import this file."""
from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def gpt2_shapes(layers: int, d: int, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """Parameter (= gradient) shapes of a GPT-2 model in state_dict order.
    gpt2_shapes(12, 768) is GPT-2 124M, gpt2_shapes(48, 1600) is GPT-2 1.5B."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]          # ln_1, attn, attn proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]      # ln_2, mlp fc, mlp proj
    return shapes + [(d,), (d,)]                                             # ln_f


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int, device: str,
                     warmup: int = 3) -> dict[str, list[float]]:
    """Call each fn `warmup` times, then run `repeats` rounds of A B C ..., timing every call in ms.
    CUDA: a pair of CUDA events around each call, synchronize after each round; a sleep kernel
    holds the stream while the host enqueues, so the figure is GPU time, free of host overhead
    (in training the host runs ahead of the GPU). CPU: perf_counter."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if cuda:
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        if cuda:
            events = {}
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                # ~2 ms of GPU sleep: longer than the host takes to enqueue any call measured here
                # (a Python optimizer step over hundreds of tensors takes ~1 ms of host time).
                torch.cuda._sleep(4_000_000)
                start.record()
                fn()
                end.record()
                events[name] = (start, end)
            torch.cuda.synchronize()
            for name, (start, end) in events.items():
                samples[name].append(start.elapsed_time(end))
        else:
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def summarize(samples: list[float]) -> dict:
    """Median, min and max of `samples` (ms), and spread = (max - min) / median."""
    med = statistics.median(samples)
    lo, hi = min(samples), max(samples)
    return {"median": med, "min": lo, "max": hi, "spread": (hi - lo) / med if med > 0 else float("nan")}


def copy_fn(device: str, nbytes: int) -> Callable[[], None]:
    """A zero-argument dst.copy_(src) over two `nbytes` uint8 buffers: the bandwidth reference.
    It moves 2 * nbytes per call (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)

    def call() -> None:
        dst.copy_(src)
    return call


RESULTS = Path(__file__).resolve().parent / "results"


def machine_tag(device: str, world: int = 1) -> str:
    """A short name for the machine a run measures, for result file names: "cpu", or the GPU's
    model ("h100" from "NVIDIA H100 80GB HBM3", "h200"), with "x<world>" for several GPUs."""
    if torch.device(device).type != "cuda":
        return "cpu"
    words = re.findall(r"[a-z0-9]+", torch.cuda.get_device_name(device).lower())
    model = next((w for w in words if any(c.isdigit() for c in w)), words[-1] if words else "gpu")
    return model + (f"x{world}" if world > 1 else "")


def results_path(json_arg: str | None, name: str, device: str, world: int = 1) -> str | None:
    """Where a benchmark writes its JSON lines: `json_arg` if given, nowhere for "-", else
    benchmarks/results/<machine>_<name>.jsonl (so a rerun replaces that machine's figures)."""
    if json_arg == "-":
        return None
    if json_arg:
        return json_arg
    RESULTS.mkdir(exist_ok=True)
    return str(RESULTS / f"{machine_tag(device, world)}_{name}.jsonl")


JSON_HELP = ("write the JSON lines here (default: benchmarks/results/<machine>_<benchmark>.jsonl; "
             "'-': do not write)")


def write_jsonl(rows: list[dict], path: str | None) -> None:
    """Write `rows` as JSON lines to `path` (nothing when path is None) and say where."""
    if path:
        with open(path, "w") as f:
            f.write("\n".join(json.dumps(row) for row in rows) + "\n")
        print(f"wrote {path}")


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def emit(rows: list[dict], json_path: str | None = None, columns: list[str] | None = None) -> None:
    """Print each row as one JSON line, then an aligned table (of `columns`, default all keys).
    If json_path is given, also write the JSON lines there."""
    for row in rows:
        print(json.dumps(row))
    if rows:
        columns = columns or list(rows[0])
        table = [columns] + [[_fmt(row.get(c)) for c in columns] for row in rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
        print()
        for r in table:
            print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    write_jsonl(rows, json_path)
