"""EXPERIMENT: the compressed step's paths timed against each other, interleaved in one process on
the GPU (MIXPREC_COMPRESSED_PATH, read by the op on every call: 0 general, 1 whole blocks
straight-line with Adam's bias correction by its reciprocal, 2 that and the loop-free code walk,
3 that and the 8-bit ratio by a reciprocal a block).
That the paths give the same bits is tests/test_compressed_state.py's (an aligned tensor against a
misaligned view); this script checks it once more on the first steps of each mode, then times
them.

  python -m scripts.ab_compressed [--model 1.5B] [--repeats 7]
"""
import argparse
import os

import torch

import mixprec
from benchmarks.bench_optimizer import MODELS, OPTIONS, make_variant
from benchmarks.harness import emit, gpt2_shapes, summarize, time_interleaved

MODES = ["ours-bf16-remainder-8bit-fast-norm", "ours-bf16-stochastic-8bit-fast-norm", "ours-bf16-8bit-fast-norm",
         "ours-bf16-remainder-bf16m-fast-norm", "ours-bf16-remainder-fp8-fast-norm"]


PATHS = ("0", "1", "2", "3")


def with_path(call, path: str):
    def run() -> None:
        os.environ["MIXPREC_COMPRESSED_PATH"] = path
        call()
    return run


def same_bits(mode: str, shapes) -> bool:
    """Three steps of each path from the same start (bf16 params, the mode's options): every
    weight and state tensor equal bit for bit."""
    results = []
    for path in PATHS:
        os.environ["MIXPREC_COMPRESSED_PATH"] = path
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen).bfloat16()) for s in shapes]
        opt = mixprec.optim.AdamW(params, lr=1e-3, weight_decay=0.1, seed=0, **OPTIONS[mode])
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen).bfloat16()
            opt.step()
        results.append([p.detach().clone() for p in params]
                       + [t.clone() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)])
    return all(all(torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
                   for a, b in zip(results[0], r)) for r in results[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.5B")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    shapes = gpt2_shapes(*MODELS[args.model])
    rows = []
    for mode in MODES:
        torch.manual_seed(0)
        identical = same_bits(mode.removesuffix("-fast-norm"), shapes[:6])
        call, _, _ = make_variant(mode, shapes, "cuda")
        fns = {path: with_path(call, path) for path in PATHS}
        stats = {k: summarize(v) for k, v in time_interleaved(fns, args.repeats, "cuda").items()}
        row = {"mode": mode, "model": args.model, "paths_bit_identical": identical}
        for path in PATHS:
            row[f"path{path}_ms"] = stats[path]["median"]
            row[f"path{path}_spread"] = stats[path]["spread"]
        for path in PATHS[1:]:
            row[f"path0_over_path{path}"] = stats["0"]["median"] / stats[path]["median"]
        rows.append(row)
        del call, fns
        torch.cuda.empty_cache()
    emit(rows, None)


if __name__ == "__main__":
    main()
