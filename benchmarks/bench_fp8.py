"""fp8 linear layers (issue 16): mixprec's "fp8" policy rule against bf16 autocast and torchao's
float8 training, on single linears (the filter's threshold) and on a GPT training step.

    python -m benchmarks.bench_fp8 [--gemms] [--train] [--steps 5] [--rounds 5]

--gemms: forward + backward of one linear, bf16 vs our fp8 linear (forced past the filter), over a
ladder of (M, K, N); the ratio says where fp8 starts to pay (mixprec.fp8.MIN_GEMM).
--train: issue 16's configuration (GPT d=2048, 16 layers, 16 heads, vocab 32768, bias-free, batch
8 x 2048, torch AdamW(fused)) as bf16 autocast eager / compiled, mixprec fp8 eager (current and
delayed scaling) / compiled and torchao float8 tensorwise / rowwise compiled, interleaved in one
process; CUDA-event medians and spreads, and each variant's peak memory from a step of its own.
Variants whose package is missing or which fail report the error instead of a time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.nn.functional as F

from benchmarks.harness import JSON_HELP, emit, results_path, summarize, time_interleaved

GEMMS = [(1024, 2048, 1024), (2048, 2048, 2048), (4096, 2048, 2048), (4096, 4096, 4096),
         (8192, 2048, 8192), (16384, 2048, 2048), (16384, 2048, 6144), (16384, 2048, 8192),
         (16384, 8192, 2048), (4096, 8192, 16384)]


def bench_gemms(repeats: int) -> list[dict]:
    from mixprec import fp8

    rows = []
    for m, k, n in GEMMS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, requires_grad=True) / k**0.5
        w = w.detach().requires_grad_()
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

        def bf16(x=x, w=w, g=g):
            F.linear(x, w).backward(g)

        def ours(x=x, w=w, g=g):  # the weight's cast is cached per version: bump it as a step would
            with torch.no_grad():
                w.add_(0.0)
            fp8._Fp8Linear.apply(x, w, torch.bfloat16).backward(g)
        t = time_interleaved({"bf16": bf16, "fp8": ours}, repeats, "cuda")
        a, b = summarize(t["bf16"]), summarize(t["fp8"])
        rows.append({"M": m, "K": k, "N": n, "log2_MKN": round(float(torch.tensor(m * k * n).log2()), 1),
                     "bf16_ms": a["median"], "fp8_ms": b["median"], "speedup": a["median"] / b["median"],
                     "spread_bf16": a["spread"], "spread_fp8": b["spread"]})
    return rows


def _gpt():
    from mixprec.models import GPT
    torch.manual_seed(0)
    return GPT(32768, 2048, 16, 2048, 16, bias=False)


def _variants(base, names: list[str]) -> dict:
    """name -> (model, optimizer, step(x, y)). The bf16 and mixprec variants share one model and
    optimizer (they differ only in the region and in compiling; a compiled model recompiles for a
    region of another policy: tests/test_autocast_compile.py), so that six variants of a 1.07B
    model fit an 80 GB GPU; torchao's variants swap its linears, so each has a copy."""
    import mixprec

    out = {}
    shared = None
    for name in names:
        try:
            if name.startswith("torchao"):
                from torchao.float8 import Float8LinearConfig, convert_to_float8_training
                model = copy.deepcopy(base).cuda()
                recipe = name.split("-")[1]
                convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                                           module_filter_fn=lambda mod, fqn: fqn != "head")
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            else:
                if shared is None:
                    model = copy.deepcopy(base).cuda()
                    mixprec.set_policy(model.head, mixprec.default_policy("cuda"))  # as torchao's filter below
                    shared = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
                model, opt = shared
            fwd = torch.compile(model) if "compile" in name or name.startswith("torchao") else model
            if name.startswith("mixprec-fp8"):
                policy = mixprec.default_policy("cuda").override({"aten::linear": "fp8"})
                region = (lambda p=policy, d="delayed" in name: _fp8_region(p, d))
            else:
                region = (lambda: torch.autocast("cuda", dtype=torch.bfloat16))

            def step(x, y, fwd=fwd, opt=opt, region=region):
                with region():
                    logits = fwd(x)
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss
            out[name] = (model, opt, step)
        except Exception as e:  # noqa: BLE001 -- a missing package or an unsupported combination: say so
            out[name] = f"{type(e).__name__}: {e}"[:200]
    return out


@contextlib.contextmanager
def _fp8_region(policy, delayed: bool):
    """The fp8 rule's region; "delayed" variants scale from amax histories (the amax is reduced in
    the cast's own pass) while their forward runs, and their backward follows the forward's choice."""
    import mixprec
    from mixprec import fp8

    if delayed:
        fp8.use_delayed_scaling()
    try:
        with mixprec.autocast("cuda", dtype=torch.bfloat16, policy=policy):
            yield
    finally:
        fp8.use_current_scaling()


def bench_train(names: list[str], steps: int, rounds: int) -> list[dict]:
    base = _gpt()
    x = torch.randint(0, 32768, (8, 2048), device="cuda")
    y = torch.randint(0, 32768, (8, 2048), device="cuda")
    variants = _variants(base, names)
    rows, fns, losses = [], {}, {}
    for name, v in variants.items():
        if isinstance(v, str):
            rows.append({"variant": name, "error": v})
            continue
        _, _, step = v
        try:
            for _ in range(3):  # compile and warm up
                step(x, y)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            losses[name] = step(x, y).item()
            model, opt, _ = v  # peak of this variant alone: its step's growth plus what it holds
            held = sum(t.numel() * t.element_size() for t in model.parameters())
            held += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                        if torch.is_tensor(t) and t.is_cuda)
            peak = torch.cuda.max_memory_allocated() - before + held
        except Exception as e:  # noqa: BLE001 -- report the failure, time the rest
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        fns[name] = (lambda step=step: [step(x, y) for _ in range(steps)])
        rows.append({"variant": name, "peak_GiB": peak / 2**30, "loss": losses[name]})
    times = time_interleaved(fns, rounds, "cuda", warmup=0)
    ref = summarize(times["bf16-eager"])["median"] / steps if "bf16-eager" in times else None
    ref_c = summarize(times["bf16-compile"])["median"] / steps if "bf16-compile" in times else None
    for row in rows:
        if row["variant"] in times:
            s = summarize([t / steps for t in times[row["variant"]]])
            row.update(step_ms=s["median"], spread=s["spread"],
                       vs_bf16_eager=ref / s["median"] if ref else None,
                       vs_bf16_compile=ref_c / s["median"] if ref_c else None)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gemms", action="store_true")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--variants", default="bf16-eager,mixprec-fp8-eager,mixprec-fp8-delayed-eager,bf16-compile,"
                                          "mixprec-fp8-compile,mixprec-fp8-delayed-compile,"
                                          "torchao-tensorwise-compile,torchao-rowwise-compile")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None, help=JSON_HELP)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8 measures fp8 tensor cores: it needs a CUDA GPU (sm_89 or newer)")
    rows = []
    if args.gemms or not args.train:
        gemm_rows = bench_gemms(args.repeats)
        emit(gemm_rows, None)
        rows += [{"part": "gemm", **r} for r in gemm_rows]
    if args.train or not args.gemms:
        train_rows = bench_train(args.variants.split(","), args.steps, args.rounds)
        emit(train_rows, None, ["variant", "step_ms", "spread", "vs_bf16_eager", "vs_bf16_compile", "peak_GiB",
                                "loss", "error"])
        rows += [{"part": "train", **r} for r in train_rows]
    info = {"part": "info", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import torchao
        info["torchao"] = torchao.__version__
    except ImportError:
        pass
    from benchmarks.harness import write_jsonl
    write_jsonl([info] + rows, results_path(args.json, "fp8", "cuda"))


if __name__ == "__main__":
    main()
