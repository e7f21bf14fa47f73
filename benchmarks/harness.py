"""Small shared helpers for the benchmarks: model shapes, an interleaved timer, summaries and output."""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable

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


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def emit(rows: list[dict], json_path: str | None = None, columns: list[str] | None = None) -> None:
    """Print each row as one JSON line, then an aligned table (of `columns`, default all keys).
    If json_path is given, also write the JSON lines there."""
    lines = [json.dumps(row) for row in rows]
    for line in lines:
        print(line)
    if json_path:
        with open(json_path, "w") as f:
            f.write("\n".join(lines) + "\n")
    if not rows:
        return
    columns = columns or list(rows[0])
    table = [columns] + [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    print()
    for r in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
