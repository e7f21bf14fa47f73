"""`mixprec bench`: train a built-in model under each precision in one process and print a table
of step time, throughput, peak memory, final loss and skipped steps, with the speed-up and
memory saving against 32-true.

Variants are timed interleaved (A B C A B C ... for `rounds` rounds, each a block of steps started
from an idle device), and the table gives the median step time over rounds with its spread
((max - min) / median), so a noisy host moves every variant alike. With compare_torch the same
run times torch's own configurations beside ours: "torch.amp 16-mixed" / "torch.amp bf16-mixed"
(torch.autocast + torch.amp.GradScaler + torch.optim.AdamW(fused=True)) and "torch 32-true".

Every variant starts from the same initial weights and sees the same batches. mixprec rows
use mixprec.Precision + mixprec.optim.AdamW (torch.optim.AdamW for 64-true, which ours does not
take). Peak memory is measured while building and warming up each variant (model, optimizer
state, activations): on CUDA max_memory_allocated above what was allocated before; on the CPU
the peak of the tensor bytes allocated, from the CPU allocator's events in torch.profiler (the
process's RSS cannot say it: malloc reuses what earlier variants freed). Every row also gives the
exact bytes of weights + grads + optimizer state it holds between steps. One untimed step of each
mode runs first, so library initialisation and workspaces fall outside every figure. A row whose
spread exceeds 50 % of its median gets a warning under the table.

Default sizes: a CPU run is a smoke test (GPT 2 layers d=64, 32 tokens x 8); on CUDA the GPT has
6 layers, d=512, 8 heads, vocab 4096, 256 tokens x 16 sequences (about 22M params, 4096 tokens
per step), the MLP 4 x 4096 wide at batch 512, the CNN 3 stages (64-128-256) on 64x64 images at
batch 128. On an H100 the default GPT step is bound by the host (about 13 ms of Python and
launches per step, so the GPU waits and spreads reach 50-100 %); `--batch 128` makes it GPU-bound
(about 22 ms per bf16 step, spreads under 2 %), which is the setting for comparing kernels.
Every variant cycles through the same 8 pre-generated batches (no data cost inside the timing),
so after many steps the final loss measures memorisation; it is there to show every mode trains
alike, not as a quality figure.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixprec import optim as mixprec_optim
from mixprec.models import CNN, GPT, MLP, MarkovText, TeacherData
from mixprec.precision import MODES, Precision, parse_precision

MODELS = ("gpt", "mlp", "cnn", "gpt-1b")
DEFAULT_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true")
TORCH_COMPARABLE = ("32-true", "16-mixed", "bf16-mixed")
# A row whose rounds spread over more than this fraction of their median gets a warning.
MAX_SPREAD = 0.5
PEAK_MEMORY_FROM = {"cuda": "torch.cuda.max_memory_allocated",
                    "cpu": "torch.profiler CPU allocator events (tensor memory)"}
SIZES: dict[tuple[str, str], dict[str, Any]] = {
    ("gpt", "cpu"): {"vocab": 64, "ctx": 32, "layers": 2, "d": 64, "heads": 4, "batch": 8},
    ("gpt", "cuda"): {"vocab": 4096, "ctx": 256, "layers": 6, "d": 512, "heads": 8, "batch": 16},
    ("mlp", "cpu"): {"dim": 64, "hidden": 128, "depth": 2, "classes": 10, "batch": 64},
    ("mlp", "cuda"): {"dim": 1024, "hidden": 4096, "depth": 4, "classes": 1000, "batch": 512},
    ("cnn", "cpu"): {"size": 16, "widths": (8, 16), "classes": 10, "batch": 16},
    ("cnn", "cuda"): {"size": 64, "widths": (64, 128, 256), "classes": 100, "batch": 128},
    # issue 16's fp8 configuration: d=2048, 16 layers, 16 heads, vocab 32768, bias-free linears,
    # 8 x 2048 tokens (on the CPU a shape-alike smoke size)
    ("gpt-1b", "cpu"): {"vocab": 256, "ctx": 32, "layers": 2, "d": 64, "heads": 4, "batch": 4, "bias": False},
    ("gpt-1b", "cuda"): {"vocab": 32768, "ctx": 2048, "layers": 16, "d": 2048, "heads": 16, "batch": 8,
                         "bias": False},
}


class MissingDependency(RuntimeError):
    """An optional package a requested output needs is not installed."""


@dataclass
class Workload:
    """A model (fp32, on the CPU: each variant copies it) and the batches every variant sees."""

    name: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    units_per_step: int
    unit: str
    config: dict[str, Any]


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_workload(name: str, device: torch.device, n_batches: int = 8, seed: int = 0,
                  batch: int | None = None) -> Workload:
    """The built-in model `name` ("gpt", "mlp", "cnn", "gpt-1b") at the size for `device`'s type (batch
    size overridable)."""
    if name not in MODELS:
        raise ValueError(f"model={name!r}; expected one of {', '.join(MODELS)}")
    cfg = dict(SIZES[(name, "cuda" if device.type == "cuda" else "cpu")])
    if batch is not None:
        if batch < 1:
            raise ValueError(f"batch={batch}; expected a positive batch size")
        cfg["batch"] = batch
    torch.manual_seed(seed)
    if name in ("gpt", "gpt-1b"):
        model = GPT(cfg["vocab"], cfg["ctx"], cfg["layers"], cfg["d"], cfg["heads"], bias=cfg.get("bias", True))
        data = MarkovText(cfg["vocab"], seed=seed, device=device)
        batches = [data.batch(cfg["batch"], cfg["ctx"]) for _ in range(n_batches)]
        return Workload(name, model, batches, _lm_loss, cfg["batch"] * cfg["ctx"], "tokens", cfg)
    if name == "mlp":
        model = MLP(cfg["dim"], cfg["hidden"], cfg["classes"], cfg["depth"])
        data = TeacherData((cfg["dim"],), cfg["classes"], seed=seed, device=device)
    else:
        model = CNN(cfg["classes"], tuple(cfg["widths"]))
        data = TeacherData((3, cfg["size"], cfg["size"]), cfg["classes"], seed=seed, device=device)
    batches = [data.batch(cfg["batch"]) for _ in range(n_batches)]
    return Workload(name, model, batches, F.cross_entropy, cfg["batch"], "samples", cfg)


@dataclass
class Variant:
    """One configuration under test: `step(x, y)` runs one full training step and returns the loss."""

    name: str
    precision: str
    impl: str  # "mixprec" or "torch"
    optimizer: str
    step: Callable[[Tensor, Tensor], Tensor]
    skipped: Callable[[int], int]
    held: Callable[[], int]
    calls: int = 0
    times_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    last_loss: Tensor | None = None


def mixprec_variant(precision: str, work: Workload, device: torch.device, lr: float, clip: float) -> Variant:
    """mixprec.Precision(precision) + mixprec.optim.AdamW: the loop of the README."""
    model = copy.deepcopy(work.model).to(device)
    if precision == "64-true":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        opt = mixprec_optim.AdamW(model.parameters(), lr=lr)
    with warnings.catch_warnings():  # the bench runs every mode on purpose
        warnings.simplefilter("ignore")
        prec = Precision(precision, device=device)
    model, opt = prec.setup(model, opt)
    loss_fn = work.loss_fn

    def step(x: Tensor, y: Tensor) -> Tensor:
        with prec.autocast():
            loss = loss_fn(model(x), y)
        prec.backward(loss)
        if clip:
            prec.clip_grad_norm_(opt, clip)
        prec.step(opt)
        opt.zero_grad(set_to_none=True)
        return loss

    return Variant(precision, precision, "mixprec", f"{type(opt).__module__}.{type(opt).__name__}", step,
                   lambda calls: prec.stats()["skipped_steps"], lambda: held_bytes(model, opt))


def torch_variant(precision: str, work: Workload, device: torch.device, lr: float, clip: float) -> Variant:
    """torch's own recipe: torch.autocast + torch.amp.GradScaler (16-mixed) + fused AdamW,
    unscale_ + clip_grad_norm_ before the step."""
    if precision not in TORCH_COMPARABLE:
        raise ValueError(f"torch comparison for precision={precision!r}; expected one of {TORCH_COMPARABLE}")
    model = copy.deepcopy(work.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    mode = MODES[precision]
    scaler = torch.amp.GradScaler(device.type) if mode.scaled else None
    loss_fn = work.loss_fn
    params = list(model.parameters())

    def step(x: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=mode.dtype, enabled=mode.mixed):
            loss = loss_fn(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def skipped(calls: int) -> int:  # fused AdamW does not count skipped steps
        state = opt.state.get(params[0], {})
        return calls - int(state["step"]) if "step" in state else calls

    name = ("torch.amp " if mode.mixed else "torch ") + precision
    return Variant(name, precision, "torch", "torch.optim.AdamW(fused=True)", step, skipped,
                   lambda: held_bytes(model, opt))


def held_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the weights, buffers, grads and optimizer state a variant keeps between steps
    (each storage counted once): exact on every device, unlike the CPU's RSS."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        add(t.grad)
    for state in opt.state.values():
        for value in state.values():
            add(value)
    return sum(seen.values())


# -- measuring ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Peak:
    bytes: int | None = None  # None: not measured


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """Peak memory growth over the block, in bytes (left None where it cannot be measured).

    CUDA: the caching allocator's peak (max_memory_allocated) above what was allocated before.
    CPU: torch keeps no allocator statistics there, and the process's RSS says nothing useful
    (malloc reuses the pages earlier variants freed, so a whole variant showed "0 B"); instead
    torch.profiler records every allocation and free of CPU tensor memory (profile_memory=True)
    and the peak of their running sum is the same figure as on CUDA, exact and repeatable."""
    peak = Peak()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = torch.cuda.max_memory_allocated(device) - base
        return
    # Kineto logs every profiler start and stop to stderr unless told otherwise (it reads this
    # at its first use); a level the user set wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        yield peak
    try:  # allocation events carry the block's address, so frees can be matched to allocations
        allocation = torch._C._profiler._ExtraFields_Allocation
        events = sorted((n.start_time_ns, n.extra_fields.ptr, n.extra_fields.alloc_size)
                        for n in _walk(prof.profiler.kineto_results.experimental_event_tree())
                        if isinstance(n.extra_fields, allocation) and n.extra_fields.device.type == "cpu")
    except (AttributeError, RuntimeError):  # this torch's profiler lacks them: not measured
        return
    live: set[int] = set()
    running = top = 0
    for _, ptr, nbytes in events:  # frees of blocks from before the block are left out
        if nbytes > 0:
            live.add(ptr)
        elif ptr in live:
            live.discard(ptr)
        else:
            continue
        running += nbytes
        top = max(top, running)
    peak.bytes = top


def _walk(nodes: list[Any]) -> Iterator[Any]:
    """Every node of a profiler event tree, depth first."""
    for node in nodes:
        yield node
        yield from _walk(node.children)


class Progress:
    """A plain text progress bar on stderr (a line per ~10 % when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30) -> None:
        self.total, self.done, self.enabled, self.width = max(1, total), 0, enabled, width
        self._last_decile = -1

    def advance(self, n: int, text: str) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {text}"
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line.ljust(self.width + 40) + ("\n" if self.done == self.total else ""))
        elif 10 * self.done // self.total != self._last_decile:
            self._last_decile = 10 * self.done // self.total
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _time_block(variant: Variant, batches: list[tuple[Tensor, Tensor]], steps: int, device: torch.device) -> float:
    """Milliseconds per step over `steps` steps, started from an idle device."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = batches[variant.calls % len(batches)]
        variant.last_loss = variant.step(x, y)
        variant.calls += 1
    if device.type == "cuda":
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    return (time.perf_counter() - t0) * 1e3 / steps


def run_bench(
    precisions: list[str] | tuple[str, ...] = DEFAULT_PRECISIONS,
    model: str = "gpt",
    steps: int | None = None,
    rounds: int | None = None,
    warmup: int | None = None,
    device: str | torch.device | None = None,
    compare_torch: bool = False,
    lr: float = 3e-4,
    clip: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    batch: int | None = None,
) -> dict[str, Any]:
    """Build every variant, warm each up (measuring its memory), time them interleaved and
    return the figures (see module docstring); `format_table` prints them."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    names = [parse_precision(p) for p in precisions]
    if len(set(names)) != len(names):
        raise ValueError(f"precisions={list(precisions)} names a mode twice")
    steps = steps if steps is not None else (100 if cuda else 20)
    rounds = rounds if rounds is not None else (10 if cuda else 5)
    warmup = warmup if warmup is not None else (3 if cuda else 1)
    if steps < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"steps={steps}, rounds={rounds}, warmup={warmup}: need steps >= 1, rounds >= 1, warmup >= 0")
    rounds = min(rounds, steps)
    per_round = steps // rounds
    work = make_workload(model, dev, seed=seed, batch=batch)
    builders: list[tuple[Callable[..., Variant], str]] = []
    for p in names:
        builders.append((mixprec_variant, p))
        if compare_torch and p in TORCH_COMPARABLE:
            builders.append((torch_variant, p))
    bar = Progress(len(builders) * (max(1, warmup) + rounds * per_round), enabled=progress)
    for p in names:  # untimed: library initialisation and workspaces land outside every figure
        throwaway = mixprec_variant(p, work, dev, lr, clip)
        _time_block(throwaway, work.batches, 1, dev)
        del throwaway
    variants: list[Variant] = []
    for build, p in builders:
        with peak_memory(dev) as peak:  # one warm-up step at least: the optimizer state exists
            variant = build(p, work, dev, lr, clip)
            _time_block(variant, work.batches, max(1, warmup), dev)
        variant.peak_bytes = peak.bytes
        variants.append(variant)
        bar.advance(max(1, warmup), f"warm-up {variant.name}")
    for r in range(rounds):  # interleaved: A B C A B C ...
        for variant in variants:
            variant.times_ms.append(_time_block(variant, work.batches, per_round, dev))
            bar.advance(per_round, f"round {r + 1}/{rounds} {variant.name}")
    rows = [_row(v, work, per_round * rounds) for v in variants]
    measured = all(r["peak_memory_bytes"] is not None for r in rows)
    memory_key = "peak_memory_bytes" if measured else "held_bytes"
    _add_ratios(rows, memory_key)
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else "CPU",
        "torch": torch.__version__,
        "model": model, "config": work.config, "steps": per_round * rounds, "rounds": rounds,
        "steps_per_round": per_round, "warmup": max(1, warmup), "lr": lr, "clip": clip,
        "compare_torch": compare_torch, "unit": work.unit, "memory_saving_of": memory_key,
        "peak_memory_from": (PEAK_MEMORY_FROM[dev.type] if measured else "not measured"),
        "warnings": noisy_rows(rows), "rows": rows,
    }


def noisy_rows(rows: list[dict[str, Any]], limit: float = MAX_SPREAD) -> list[str]:
    """One warning per row whose spread exceeds `limit`: its median is not a figure to compare."""
    return [f"{r['name']}: spread {100 * r['spread']:.0f} % of the median step time (over "
            f"{100 * limit:.0f} %): the machine was busy or the step is bound by the host; its "
            "median and ratios mean little (rerun with more --steps, or a larger --batch on the GPU)"
            for r in rows if r["spread"] > limit]


def _row(v: Variant, work: Workload, timed_steps: int) -> dict[str, Any]:
    median = statistics.median(v.times_ms)
    return {
        "name": v.name, "precision": v.precision, "impl": v.impl, "optimizer": v.optimizer,
        "step_ms": median, "step_ms_min": min(v.times_ms), "step_ms_max": max(v.times_ms),
        "spread": (max(v.times_ms) - min(v.times_ms)) / median if median else 0.0,
        "step_ms_rounds": v.times_ms,
        f"{work.unit}_per_s": work.units_per_step * 1e3 / median if median else float("inf"),
        "peak_memory_bytes": v.peak_bytes, "held_bytes": v.held(),
        "final_loss": float(v.last_loss.item()) if v.last_loss is not None else float("nan"),
        "skipped_steps": int(v.skipped(v.calls)), "steps_total": v.calls, "timed_steps": timed_steps,
    }


def _add_ratios(rows: list[dict[str, Any]], memory_key: str) -> None:
    """Speed-up and memory saving (by `memory_key`) against mixprec's 32-true; speed against
    torch's same mode."""
    base = next((r for r in rows if r["impl"] == "mixprec" and r["precision"] == "32-true"), None)
    torch_rows = {r["precision"]: r for r in rows if r["impl"] == "torch"}
    for r in rows:
        r["speedup_vs_32"] = base["step_ms"] / r["step_ms"] if base and r["step_ms"] else None
        r["memory_saving_vs_32"] = (1 - r[memory_key] / base[memory_key] if base and base[memory_key] else None)
        ref = torch_rows.get(r["precision"]) if r["impl"] == "mixprec" else None
        r["speed_vs_torch"] = ref["step_ms"] / r["step_ms"] if ref and r["step_ms"] else None


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "not measured"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(result: dict[str, Any]) -> str:
    """The figures as a Markdown table, with a header line saying what was measured."""
    unit = result["unit"]
    head = ["variant", "step ms (median)", "spread", f"{unit}/s", "peak memory", "weights+state", "final loss", "skipped",
            "speed-up vs 32-true",
            "memory saving vs 32-true "
            + ("(peak)" if result["memory_saving_of"] == "peak_memory_bytes" else "(weights+state)")]
    if result["compare_torch"]:
        head.append("speed vs torch (same mode)")
    title = (f"mixprec bench: model {result['model']} {result['config']} on {result['device_name']} "
             f"({result['device']}), torch {result['torch']}; {result['steps']} timed steps per variant "
             f"in {result['rounds']} interleaved rounds after {result['warmup']} warm-up; peak memory: "
             f"{result['peak_memory_from']}")
    lines = [title, "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["name"], f"{r['step_ms']:.3f}", f"{100 * r['spread']:.1f} %", f"{r[f'{unit}_per_s']:,.0f}",
                 _fmt_bytes(r["peak_memory_bytes"]), _fmt_bytes(r["held_bytes"]), f"{r['final_loss']:.4f}", str(r["skipped_steps"]),
                 "-" if r["speedup_vs_32"] is None else f"{r['speedup_vs_32']:.2f}x",
                 "-" if r["memory_saving_vs_32"] is None else f"{100 * r['memory_saving_vs_32']:.0f} %"]
        if result["compare_torch"]:
            cells.append("-" if r["speed_vs_torch"] is None else f"{r['speed_vs_torch']:.3f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def require_matplotlib() -> Any:
    """matplotlib.pyplot with a file backend, or MissingDependency saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingDependency(
            "--plot needs matplotlib, which is not installed: pip install 'mixprec[bench]' "
            "(or pip install matplotlib), or leave out --plot") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(result: dict[str, Any], path: str) -> None:
    """Bar charts of median step time (min-max whiskers) and peak memory per variant, as a PNG."""
    plt = require_matplotlib()
    rows = result["rows"]
    names = [r["name"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)), 4))
    med = [r["step_ms"] for r in rows]
    err = [[m - r["step_ms_min"] for m, r in zip(med, rows)], [r["step_ms_max"] - m for m, r in zip(med, rows)]]
    colors = ["tab:orange" if r["impl"] == "torch" else "tab:blue" for r in rows]
    ax_t.bar(names, med, yerr=err, color=colors, capsize=3)
    ax_t.set_ylabel("ms per step (median, min-max)")
    ax_m.bar(names, [(r["peak_memory_bytes"] or 0) / 2**20 for r in rows], color=colors)
    ax_m.set_ylabel(f"peak memory (MiB), {result['peak_memory_from']}")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(f"mixprec bench: {result['model']} on {result['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
