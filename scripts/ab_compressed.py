"""EXPERIMENT: the compressed step's whole-block path against the general one, interleaved in one
process on the GPU (MIXPREC_COMPRESSED_WHOLE, read by the op on every call, picks the path).
Correctness of both paths is tests/test_compressed_state.py's (CPU = CUDA bit for bit, aligned
and misaligned views); this script only times them.

  python -m scripts.ab_compressed [--model 1.5B] [--repeats 7]
"""
import argparse
import os

import torch

from benchmarks.bench_optimizer import MODELS, make_variant
from benchmarks.harness import emit, gpt2_shapes, summarize, time_interleaved

MODES = ["ours-bf16-remainder-8bit-fast-norm", "ours-bf16-stochastic-8bit-fast-norm", "ours-bf16-8bit-fast-norm",
         "ours-bf16-remainder-bf16m-fast-norm"]


def with_path(call, whole: bool):
    def run() -> None:
        os.environ["MIXPREC_COMPRESSED_WHOLE"] = "1" if whole else "0"
        call()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.5B")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    shapes = gpt2_shapes(*MODELS[args.model])
    rows = []
    for mode in MODES:
        torch.manual_seed(0)
        call, _, _ = make_variant(mode, shapes, "cuda")
        fns = {"whole": with_path(call, True), "general": with_path(call, False)}
        stats = {k: summarize(v) for k, v in time_interleaved(fns, args.repeats, "cuda").items()}
        rows.append({"mode": mode, "model": args.model, "whole_ms": stats["whole"]["median"],
                     "general_ms": stats["general"]["median"],
                     "general_over_whole": stats["general"]["median"] / stats["whole"]["median"],
                     "spread_whole": stats["whole"]["spread"], "spread_general": stats["general"]["spread"]})
        del call, fns
        torch.cuda.empty_cache()
    emit(rows, None)


if __name__ == "__main__":
    main()
