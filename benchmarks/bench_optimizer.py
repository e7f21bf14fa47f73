"""GPU time of one optimizer step with loss scaling and grad-norm clipping, torch vs mixprec, on
GPT-2 sized parameter lists, with a dst.copy_(src) reference timed in the same interleaved rounds.

Variants (AdamW lr=3e-4, weight_decay=0.1; clip to norm 1.0; scale 65536):
  torch      torch.amp.GradScaler + torch.optim.AdamW(fused=True; foreach=True on CPU), fp32 params:
             scaler.unscale_(opt); clip_grad_norm_(params, 1.0, foreach=True); scaler.step(opt); scaler.update()
  ours-fp32  mixprec.GradScaler + mixprec.optim.AdamW, fp32 params:
             scaler.clip_grad_norm_(opt, 1.0); scaler.step(opt); scaler.update()
  ours-fp16, ours-bf16  the same on fp16 / bf16 params and grads (fp32 master weights and moments)
  ours-bf16-stochastic, ours-bf16-kahan, ours-bf16-nearest  bf16 params without master weights
             (master_weights=False, rounding=...): fp32 moments only, plus a bf16 compensation
             buffer for kahan
The limit is the ideal bytes per call (32 B/param for fp32 params, also used for torch's sequence;
30 B/param with master weights) over the copy bandwidth measured in the same run.
Variants run in groups that fit in GPU memory, each with its own torch set; ratios to torch use the
torch time of the same group. Examples:
  python -m benchmarks.bench_optimizer                       # cuda, 124M and 1.5B
  python -m benchmarks.bench_optimizer --device cpu --models tiny --repeats 2   # smoke test

CPU step rows (--cpu-step): the optimizer step alone (no scaler, no clipping) on 34.6M params in 17
fp32/bf16 tensors, ours in every storage mode against torch.optim.AdamW(fused=True), interleaved.
GB/s counts each mode's own bytes per param (STEP_BYTES); pct_torch is that over the GB/s of
torch's fused fp32 step in the same run (issue 13's target: fp32 at least as fast, every mode >= 90 %):
  python -m benchmarks.bench_optimizer --device cpu --cpu-step --repeats 15
"""
from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Callable

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

MODELS = {"tiny": (2, 64, 1000, 64), "124M": (12, 768), "1.5B": (48, 1600)}
# Any "ours-*" variant also runs as "<variant>-fast-norm": clip_grad_norm_(exact=False).
VARIANTS = {"torch": torch.float32, "ours-fp32": torch.float32, "ours-fp32-keep-grads": torch.float32,
            "ours-fp16": torch.float16, "ours-bf16": torch.bfloat16, "ours-bf16-stochastic": torch.bfloat16,
            "ours-bf16-kahan": torch.bfloat16, "ours-bf16-nearest": torch.bfloat16,
            # compressed state (issue 15), bitsandbytes' AdamW8bit (its step alone, fp32 params) and
            # torchao's AdamW8bit (its step alone, compiled, bf16 params rounded stochastically)
            "ours-bf16-remainder": torch.bfloat16, "ours-bf16-remainder-bf16m": torch.bfloat16,
            "ours-bf16-8bit": torch.bfloat16, "ours-bf16-remainder-8bit": torch.bfloat16,
            "ours-bf16-stochastic-8bit": torch.bfloat16, "ours-bf16-remainder-fp8": torch.bfloat16,
            "ours-bf16-stochastic-fp8": torch.bfloat16, "bnb-8bit": torch.float32,
            "torchao-8bit": torch.bfloat16}
# The optimizer options of each "ours-*" variant.
OPTIONS = {"ours-fp32-keep-grads": {"write_back_grads": False},
           "ours-bf16-stochastic": {"master_weights": False, "rounding": "stochastic"},
           "ours-bf16-kahan": {"master_weights": False, "rounding": "kahan"},
           "ours-bf16-nearest": {"master_weights": False, "rounding": "nearest"},
           "ours-bf16-remainder": {"master_weights": "remainder"},
           "ours-bf16-remainder-bf16m": {"master_weights": "remainder", "moments": "bf16"},
           "ours-bf16-8bit": {"moments": "8bit"},
           "ours-bf16-remainder-8bit": {"master_weights": "remainder", "moments": "8bit"},
           "ours-bf16-stochastic-8bit": {"master_weights": False, "rounding": "stochastic", "moments": "8bit"},
           "ours-bf16-remainder-fp8": {"master_weights": "remainder", "moments": "fp8"},
           "ours-bf16-stochastic-fp8": {"master_weights": False, "rounding": "stochastic", "moments": "fp8"}}
# Ideal bytes moved per param per call. fp32: grad read twice (norm, step) 8 + param r/w 8 + two
# moments r/w 16 + the unscaled, clipped grad written back 4 (as torch's fused step leaves p.grad;
# "keep-grads" is write_back_grads=False, without that write). With master weights: grad 2*2 +
# master r/w 8 + moments 16 + weight written 2 + grad written back 2. Without master weights: grad
# 2*2 + weight r/w 4 + moments 16 + grad written back 2 (+ compensation r/w 4 for kahan). torch's
# recipe moves more (unscale_ and clip rewrite the grads); its limit is counted as fp32's without
# the write-back, 32.
# Compressed state: the remainder adds its r/w 4 to the weight's r/w 4 (no master); 8-bit moments
# move 4 (codes r/w; absmax 0.06 more), as fp8 moments do, bf16 moments 8. bitsandbytes' step alone on fp32 params:
# grad 4 + param r/w 8 + codes 4; torchao's on bf16 params: grad 2 + param r/w 4 + codes 4.
MOVED_BYTES = {"torch": 32, "ours-fp32": 36, "ours-fp32-keep-grads": 32, "ours-fp16": 32, "ours-bf16": 32,
               "ours-bf16-stochastic": 26, "ours-bf16-kahan": 30, "ours-bf16-nearest": 26,
               "ours-bf16-remainder": 30, "ours-bf16-remainder-bf16m": 22, "ours-bf16-8bit": 20,
               "ours-bf16-remainder-8bit": 18, "ours-bf16-stochastic-8bit": 14, "ours-bf16-remainder-fp8": 18,
               "ours-bf16-stochastic-fp8": 14, "bnb-8bit": 16,
               "torchao-8bit": 10}
# The step alone (--cpu-step), bytes per param: fp32 AdamW reads grad, param, m, v and writes param,
# m, v (28); with fp32 master: grad 2 + master r/w 8 + m, v r/w 16 + weight written 2 (28); without
# master: grad 2 + weight r/w 4 + m, v 16 (22), + compensation r/w 4 for kahan (26); amsgrad adds
# max_exp_avg_sq r/w 8; SGD with momentum: grad 4 + param r/w 8 + buffer r/w 8 (20); torch's fused
# bf16 step keeps bf16 moments: grad 2 + param, m, v r/w 12 (14). Compressed state (issue 15):
# grad 2 + weight r/w 4, + remainder r/w 4, + codes r/w 4 (8-bit) or m, v r/w 8 (bf16).
STEP_BYTES = {"torch-fused": 28, "torch-fused-bf16": 14, "ours-fp32": 28, "ours-fp32-amsgrad": 36,
              "ours-fp16": 28, "ours-bf16": 28, "ours-bf16-stochastic": 22, "ours-bf16-nearest": 22,
              "ours-bf16-kahan": 26, "torch-sgd-fused": 20, "ours-sgd-fp32": 20,
              "ours-bf16-remainder-8bit": 14, "ours-bf16-stochastic-8bit": 10, "ours-bf16-remainder-bf16m": 18,
              "ours-bf16-remainder-fp8": 14, "ours-bf16-stochastic-fp8": 10}
CPU_STEP_SHAPES = [(2035, 1000)] * 17   # 34.6M params in 17 tensors (issue 13's CPU measurement)
CPU_STEP_COLUMNS = ["variant", "ms", "spread", "gbps", "pct_torch", "x_torch", "B_per_param"]
SET_BYTES = 16   # params + grads + state per param, at most (4+4+8 or 2+2+12; 2+2+8(+2) without master)
TARGETS_MS = {"124M": 1.5, "1.5B": 19.0}   # the targets
COLUMNS = ["model", "group", "variant", "ms", "spread", "gbps", "x_limit", "x_torch", "held_B_per_param",
           "limit_ms"]
INIT_SCALE = 2.0 ** 16


def base_variant(name: str) -> str:
    """The variant a "-fast-norm" one is of (same bytes, clip_grad_norm_(exact=False))."""
    return name.removesuffix("-fast-norm") if name.startswith("ours-") else name


def held_bytes_per_param(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> float:
    """Weights + optimizer state (not grads, not step counters), from the allocated tensors."""
    n = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params)
    state = sum(tensor_bytes(t) for s in opt.state.values() for k, t in s.items()
                if isinstance(t, torch.Tensor) and k != "step")
    return (weights + state) / n


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a state tensor holds; torchao's 8-bit state is a subclass whose own dtype is the
    param's, so its parts (codes, scale, qmap) are counted instead."""
    parts = getattr(t, "tensor_attrs", None)
    if parts:
        return sum(tensor_bytes(getattr(t, name)) for name in parts)
    return t.numel() * t.element_size()


def make_variant(name: str, shapes: list[tuple[int, ...]], device: str
                 ) -> tuple[Callable[[], None], str, Callable[[], float]]:
    """Params, grads, scaler and optimizer for one variant; returns the per-call step, a note and
    a function measuring the bytes held per param (call it after the first step)."""
    dtype = VARIANTS[base_variant(name)]
    params = [(torch.randn(s, device=device, dtype=dtype) * 0.02).requires_grad_() for s in shapes]
    for p in params:
        # Grads as a scaled backward would leave them. torch's unscale_ rewrites them in place on every
        # call, so its grads shrink towards zero; the bytes moved, and so the GPU time, stay the same.
        p.grad = torch.randn_like(p) * (1e-3 * INIT_SCALE)
    dev = torch.device(device).type
    one = torch.ones((), device=device)
    if name == "torch":
        # fused AdamW is the fast torch path on CUDA; on CPU foreach is the path every torch version has.
        flag = {"fused": True} if dev == "cuda" else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, **flag)
        scaler = torch.amp.GradScaler(dev, init_scale=INIT_SCALE)
        scaler.scale(one)   # creates scaler._scale, as the first scaled loss would

        def call() -> None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            scaler.step(opt)
            scaler.update()
        return call, "torch AdamW " + next(iter(flag)), lambda: held_bytes_per_param(params, opt)
    if name == "bnb-8bit":
        import bitsandbytes as bnb  # the GPU machine gets it as a wheel (.whl)
        opt = bnb.optim.AdamW8bit(params, lr=3e-4, weight_decay=0.1)
        for p in params:
            p.grad.div_(INIT_SCALE)   # unscaled: bitsandbytes' step takes no scaler
        return opt.step, "bitsandbytes AdamW8bit (step only)", lambda: held_bytes_per_param(params, opt)
    if name == "torchao-8bit":
        from torchao.optim import AdamW8bit  # the GPU machine gets it as a wheel (.whl)
        # bf16 params without master weights, stochastically rounded: as ours-bf16-stochastic-8bit
        opt = AdamW8bit(params, lr=3e-4, weight_decay=0.1, bf16_stochastic_round=True)   # compiles on first use
        for p in params:
            p.grad = p.grad.div_(INIT_SCALE).to(dtype)
        return opt.step, "torchao AdamW8bit (step only, compiled)", lambda: held_bytes_per_param(params, opt)
    exact = not name.endswith("-fast-norm")   # -fast-norm: clip_grad_norm_(exact=False)
    name = name.removesuffix("-fast-norm")
    options = OPTIONS.get(name, {})
    opt = mixprec.optim.AdamW(params, lr=3e-4, weight_decay=0.1, **options)
    scaler = mixprec.GradScaler(dev, init_scale=INIT_SCALE)
    scaler.scale(one)

    def call() -> None:
        scaler.clip_grad_norm_(opt, 1.0, exact=exact)   # one read: norm + inf check; the step unscales and clips
        scaler.step(opt)
        scaler.update()
    note = "mixprec AdamW" + "".join(f" {k}={v}" for k, v in options.items()) + ("" if exact else " exact=False")
    return call, note, \
        lambda: held_bytes_per_param(params, opt)


def plan_groups(variants: list[str], n_params: int, device: str, copy_bytes: int,
                sets_per_group: int) -> list[list[str]]:
    """Split the variants into groups whose sets fit in memory together; torch (if asked for)
    goes into every group so each group has its own torch time to compare with."""
    if sets_per_group <= 0:
        if torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            # 5 % headroom for the norm's and the allocator's extra memory: 1.5B on an 80 GB H100 gives 3.
            sets_per_group = max(1, int((free - copy_bytes) / (1.05 * SET_BYTES * n_params)))
        else:
            sets_per_group = len(variants)
    ours = [v for v in variants if v != "torch"]
    if "torch" not in variants:
        return [ours[i:i + sets_per_group] for i in range(0, len(ours), sets_per_group)]
    if not ours:
        return [["torch"]]
    k = max(1, sets_per_group - 1)
    return [["torch"] + ours[i:i + k] for i in range(0, len(ours), k)]


def bench_group(model: str, group: int, names: list[str], device: str, repeats: int,
                copy_bytes: int) -> list[dict]:
    """Build every set of the group, time them and the copy reference interleaved, return rows."""
    shapes = gpt2_shapes(*MODELS[model])
    n = sum(torch.Size(s).numel() for s in shapes)
    torch.manual_seed(0)
    fns, notes, held = {}, {}, {}
    for name in names:
        fns[name], notes[name], held[name] = make_variant(name, shapes, device)
    fns["copy"] = copy_fn(device, copy_bytes)   # moves 2 * copy_bytes per call
    stats = {k: summarize(v) for k, v in time_interleaved(fns, repeats, device).items()}
    held = {k: f() for k, f in held.items()}   # state exists now (the warm-up stepped)
    del fns   # the closures hold the params, grads and state: let them go before the next group
    copy_gbps = 2 * copy_bytes / stats["copy"]["median"] / 1e6
    torch_ms = stats["torch"]["median"] if "torch" in stats else None
    rows = []
    for name in names:
        ms, moved = stats[name]["median"], MOVED_BYTES[base_variant(name)] * n
        limit_ms = moved / copy_gbps / 1e6
        rows.append({
            "model": model, "group": group, "variant": name, "ms": ms, "spread": stats[name]["spread"],
            "gbps": moved / ms / 1e6, "x_limit": ms / limit_ms, "x_torch": ms / torch_ms if torch_ms else None,
            "held_B_per_param": held[name], "limit_ms": limit_ms, "moved_B_per_param": MOVED_BYTES[base_variant(name)],
            "params": n, "n_tensors": len(shapes), "copy_gbps": copy_gbps, "copy_spread": stats["copy"]["spread"],
            "min_ms": stats[name]["min"], "max_ms": stats[name]["max"], "optimizer": notes[name],
            "target_ms": TARGETS_MS.get(model), "repeats": repeats, "device": device,
            "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "mixprec_version": getattr(mixprec, "__version__", None),
        })
    return rows


def cpu_step_bytes(name: str) -> int:
    """STEP_BYTES of a --cpu-step variant; "<variant>-avx2" is <variant> with our loops capped at
    their AVX2 build (MIXPREC_CPU_VECTOR=avx2), to compare it with the AVX-512 build in one run."""
    return STEP_BYTES[name.removesuffix("-avx2") if name.startswith("ours-") else name]


def make_cpu_step(name: str, shapes: list[tuple[int, ...]]) -> Callable[[], None]:
    """Params with grads and an optimizer for one --cpu-step variant; returns its step."""
    if name.startswith("ours-") and name.endswith("-avx2"):
        inner = make_cpu_step(name.removesuffix("-avx2"), shapes)

        def capped() -> None:
            previous = os.environ.pop("MIXPREC_CPU_VECTOR", None)
            os.environ["MIXPREC_CPU_VECTOR"] = "avx2"
            try:
                inner()
            finally:
                del os.environ["MIXPREC_CPU_VECTOR"]
                if previous is not None:
                    os.environ["MIXPREC_CPU_VECTOR"] = previous
        return capped
    dtype = torch.bfloat16 if "bf16" in name else torch.float16 if "fp16" in name else torch.float32
    params = [(torch.randn(s, dtype=dtype) * 0.02).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    if name.startswith("torch-sgd"):
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, fused=True).step
    if name.startswith("torch"):
        return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, fused=True).step
    if name.startswith("ours-sgd"):
        return mixprec.optim.SGD(params, lr=1e-2, momentum=0.9).step
    if name in OPTIONS and "moments" in OPTIONS[name]:  # compressed state
        return mixprec.optim.AdamW(params, lr=3e-4, weight_decay=0.1, **OPTIONS[name]).step
    rounding = name.removeprefix("ours-bf16-") if name.startswith("ours-bf16-") else None
    options = {"master_weights": False, "rounding": rounding} if rounding else {}
    return mixprec.optim.AdamW(params, lr=3e-4, weight_decay=0.1, amsgrad=name.endswith("amsgrad"),
                               **options).step


def bench_cpu_step(repeats: int, variants: list[str]) -> list[dict]:
    """Times the step alone of every variant, interleaved; rates against torch's fused fp32 step."""
    shapes = CPU_STEP_SHAPES
    n = sum(torch.Size(s).numel() for s in shapes)
    torch.manual_seed(0)
    fns = {name: make_cpu_step(name, shapes) for name in variants}
    stats = {k: summarize(v) for k, v in time_interleaved(fns, repeats, "cpu").items()}
    del fns
    torch_ms = stats["torch-fused"]["median"]
    torch_gbps = STEP_BYTES["torch-fused"] * n / torch_ms / 1e6
    rows = []
    for name in variants:
        ms = stats[name]["median"]
        gbps = cpu_step_bytes(name) * n / ms / 1e6
        rows.append({"variant": name, "ms": ms, "spread": stats[name]["spread"], "gbps": gbps,
                     "pct_torch": 100 * gbps / torch_gbps, "x_torch": ms / torch_ms,
                     "B_per_param": cpu_step_bytes(name), "params": n, "n_tensors": len(shapes),
                     "min_ms": stats[name]["min"], "max_ms": stats[name]["max"], "repeats": repeats,
                     "device": "cpu", "threads": torch.get_num_threads(), "torch_version": torch.__version__,
                     "mixprec_version": getattr(mixprec, "__version__", None)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None, help="comma list of tiny,124M,1.5B (default: 124M,1.5B on cuda, tiny on cpu)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=None, help="default 20 on cuda, 5 on cpu")
    p.add_argument("--sets-per-group", type=int, default=0,
                   help="variants timed together (torch included); 0 = as many as fit in free memory")
    p.add_argument("--json", default=None, help=JSON_HELP)
    p.add_argument("--cpu-step", action="store_true",
                   help="CPU only: the step alone of every storage mode against torch's fused AdamW (34.6M params)")
    args = p.parse_args()

    if args.cpu_step:
        if torch.device(args.device).type != "cpu":
            p.error("--cpu-step measures the CPU kernels: pass --device cpu")
        variants = list(STEP_BYTES) if args.variants == ",".join(VARIANTS) else args.variants.split(",")
        unknown = [v for v in variants if v.removesuffix("-avx2") not in STEP_BYTES]
        if unknown or "torch-fused" not in variants:
            p.error(f"--cpu-step variants are {list(STEP_BYTES)} (torch-fused included); unknown: {unknown}")
        rows = bench_cpu_step(args.repeats or 11, variants)
        emit(rows, results_path(args.json, "optimizer_cpu_step", args.device), CPU_STEP_COLUMNS)
        print(f"\n# cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, {rows[0]['repeats']} "
              "interleaved repeats; ms = median wall time per step, spread = (max - min) / median; GB/s over "
              "each mode's own bytes (B_per_param); pct_torch = GB/s as % of torch's fused fp32 AdamW step; "
              "x_torch = ms / that step's ms. Target (issue 13): ours-fp32 x_torch <= 1, every mode pct_torch >= 90")
        return

    cuda = torch.device(args.device).type == "cuda"
    models = (args.models or ("124M,1.5B" if cuda else "tiny")).split(",")
    variants = args.variants.split(",")
    unknown = [v for v in variants if base_variant(v) not in VARIANTS] + [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown variants/models: {unknown}")
    repeats = args.repeats or (20 if cuda else 5)
    copy_bytes = (1 << 30) if cuda else (64 << 20)   # 1 GiB on the GPU: leaves room for three sets

    rows = []
    for model in models:
        n = sum(torch.Size(s).numel() for s in gpt2_shapes(*MODELS[model]))
        for g, names in enumerate(plan_groups(variants, n, args.device, 2 * copy_bytes, args.sets_per_group)):
            rows += bench_group(model, g, names, args.device, repeats, copy_bytes)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    emit(rows, results_path(args.json, "optimizer", args.device), COLUMNS)
    print(f"\n# {rows[0]['device_name']}, torch {torch.__version__}, {repeats} interleaved repeats; "
          f"torch variant: {next((r['optimizer'] for r in rows if r['variant'] == 'torch'), '-')}; "
          "ms = median time per call (GPU time on cuda), spread = (max - min) / median; "
          "GB/s and limit from the ideal bytes moved (MOVED_BYTES, the grad write-back included): 36 B/param "
          "(fp32; torch and keep-grads 32), 32 (fp16/bf16 with fp32 master), 26 (bf16 without master), 30 "
          "(kahan); held = weights + optimizer state "
          "per param, from the allocated tensors; x_torch against the torch row of the same group")
    print("# issue targets: 124M <= 1.5 ms, 1.5B <= 19 ms "
          "(limit at 3.0 TB/s copy: 124M 1.33 ms, 1.5B 16.6 ms)")


if __name__ == "__main__":
    main()
