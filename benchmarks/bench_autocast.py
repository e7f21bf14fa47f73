"""What mixprec.autocast costs next to torch.autocast, side by side in one process.

(a) a tiny GPT forward (4 layers, d=128, batch 1, seq 64, no_grad): launch-bound, so every
    microsecond of per-op overhead shows. Variants: no autocast; torch.autocast; mixprec.autocast
    with torch's policy; with a policy that differs (softmax/layer_norm overridden: those ops go
    through mixprec's C++ kernel); with every op of the table routed through the kernel
    ("handle_all", the worst case); with the persistent weight cache; and the same forwards
    compiled (torch.compile, region around the compiled model).
(b) a GPT-2 124M train step (batch 8 x 1024, fp16 autocast + torch.amp.GradScaler + fused AdamW):
    none / torch.autocast / mixprec.autocast (default policy, overridden policy, handle_all).

Timing, variants interleaved A B C ... in rounds, median and spread over rounds: (a) wall clock
per call with a synchronize after each call (launch-bound: the host is what a user waits for);
(b) GPU time from CUDA events (harness.time_interleaved: the step is GPU-bound, and the shared
host's hiccups would otherwise dominate the spread). It also counts the cast kernels
per forward (record=True), to show what torch.autocast spends re-casting weights.
Usage: python -m benchmarks.bench_autocast [--json out.jsonl | --json -] [--rounds N] [--no-compile]
(results: benchmarks/results/<machine>_autocast.jsonl by default)
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import mixprec
from benchmarks import harness
from mixprec.models import GPT
from mixprec.policy import default_policy


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_rounds(fns: dict[str, Callable[[], None]], rounds: int, calls: int, device: str) -> dict[str, list[float]]:
    """Per variant, per round: the mean wall time (µs) of `calls` synchronised calls; variants
    interleaved in every round so drifts in the shared CPU's speed hit all of them alike."""
    for fn in fns.values():  # warm-up (and compile)
        for _ in range(3):
            fn()
        _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
                _sync(device)
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return samples


def _row(case: str, name: str, samples: list[float], base: float | None, torch_ref: float | None) -> dict:
    s = harness.summarize(samples)
    return {
        "case": case, "variant": name, "median_us": round(s["median"], 1), "spread": round(s["spread"], 3),
        "x_torch_autocast": round(s["median"] / torch_ref, 3) if torch_ref else None,
        "x_no_autocast": round(s["median"] / base, 3) if base else None,
    }


def _regions(device: str, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    changed = default_policy(device).override({F.softmax: "fp32", F.layer_norm: "lower"})
    handle_all = mixprec.autocast(device, dtype=dtype)
    handle_all._state = default_policy(device).state(handle_all=True)  # every table op via our kernel

    def all_ops():
        return handle_all

    return {
        "torch.autocast": lambda: torch.autocast(device, dtype=dtype),
        "mixprec (torch's policy)": lambda: mixprec.autocast(device, dtype=dtype),
        "mixprec (softmax fp32, layer_norm lower)": lambda: mixprec.autocast(device, dtype=dtype, policy=changed),
        "mixprec (handle_all)": all_ops,
    }


def bench_tiny_forward(device: str, dtype: torch.dtype, rounds: int, compile_too: bool) -> list[dict]:
    torch.manual_seed(0)
    model = GPT(vocab=1024, ctx=64, layers=4, d=128, heads=4).to(device).eval()
    idx = torch.randint(1024, (1, 64), device=device)

    def forward_in(region_factory, net=model):
        def call():
            with torch.no_grad(), region_factory():
                net(idx)
        return call

    def plain():
        with torch.no_grad():
            model(idx)

    fns = {"no autocast": plain}
    regions = _regions(device, dtype)
    fns.update({name: forward_in(factory) for name, factory in regions.items()})
    fns["mixprec weight_cache=True"] = forward_in(lambda: mixprec.autocast(device, dtype=dtype, weight_cache=True))
    rows = []
    samples = time_rounds(fns, rounds, calls=20, device=device)
    base, ref = statistics.median(samples["no autocast"]), statistics.median(samples["torch.autocast"])
    rows += [_row("(a) tiny GPT forward", n, s, base, ref) for n, s in samples.items()]

    # the casts each forward makes (what the weight cache removes)
    for name, kwargs in (("torch's policy", {}), ("weight_cache=True", {"weight_cache": True})):
        with torch.no_grad():
            with mixprec.autocast(device, dtype=dtype, **kwargs):
                model(idx)  # fills the weight cache
            with mixprec.autocast(device, dtype=dtype, record=True, **kwargs) as region:
                model(idx)
        rows.append({"case": "(a) casts per forward", "variant": f"mixprec {name}",
                     "median_us": None, "casts": sum(region.records["casts"].values())})
    mixprec.clear_weight_cache()

    if compile_too:
        compiled = torch.compile(model)
        cfns = {
            "compiled, torch.autocast": forward_in(regions["torch.autocast"], compiled),
            "compiled, mixprec (torch's policy)": forward_in(regions["mixprec (torch's policy)"], compiled),
        }
        samples = time_rounds(cfns, rounds, calls=50, device=device)
        ref = statistics.median(samples["compiled, torch.autocast"])
        rows += [_row("(a) tiny GPT forward", n, s, None, ref) for n, s in samples.items()]
    return rows


def bench_train_step(device: str, rounds: int, batch: int, seq: int, layers: int, d: int) -> list[dict]:
    torch.manual_seed(0)
    model = GPT(vocab=50257, ctx=seq, layers=layers, d=d, heads=max(1, d // 64)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    scaler = torch.amp.GradScaler(device)
    idx = torch.randint(50257, (batch, seq), device=device)
    target = torch.randint(50257, (batch, seq), device=device)

    def step_in(region_factory):
        def call():
            with region_factory():
                logits = model(idx)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), target.view(-1))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        return call

    def plain():
        loss = F.cross_entropy(model(idx).view(-1, 50257), target.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {"no autocast": plain}
    fns.update({name: step_in(f) for name, f in _regions(device, torch.float16).items()})
    if device == "cuda":  # GPU-bound: GPU time from CUDA events (host enqueue hidden), in µs
        samples = {k: [v * 1e3 for v in vs] for k, vs in harness.time_interleaved(fns, rounds, device).items()}
    else:
        samples = time_rounds(fns, rounds, calls=3, device=device)
    base, ref = statistics.median(samples["no autocast"]), statistics.median(samples["torch.autocast"])
    case = f"(b) GPT {layers}x{d} train step, {batch}x{seq}"
    return [_row(case, n, s, base, ref) for n, s in samples.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help=harness.JSON_HELP)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    rows = bench_tiny_forward(device, dtype, args.rounds, compile_too=not args.no_compile)
    if device == "cuda":
        rows += bench_train_step(device, max(5, args.rounds // 4), batch=8, seq=1024, layers=12, d=768)
    else:  # a CPU-sized stand-in for (b)
        rows += bench_train_step(device, max(3, args.rounds // 10), batch=2, seq=64, layers=2, d=128)
    for row in rows:
        row.update({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__})
    columns = ["case", "variant", "median_us", "spread", "x_torch_autocast", "x_no_autocast", "casts"]
    harness.emit(rows, harness.results_path(args.json, "autocast", device), columns=columns)


if __name__ == "__main__":
    main()
