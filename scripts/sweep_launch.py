"""Sweep the CUDA launch-shape overrides on this GPU: one line per setting.

Each setting runs benchmarks/bench_unscale.py and/or benchmarks/bench_optimizer.py in a fresh
process (the MIXPREC_* overrides are read once, at a device's first launch; see
csrc/cuda/launch_shape.cuh) and prints, per setting, unscale's % of copy bandwidth per
model/dtype and the optimizer's time over its traffic limit (x_limit) per model/variant. The
best rows become the device's defaults in launch_shape.cu's kTuned table.

    python -m scripts.sweep_launch                 # the default grid (a few minutes on an H200)
    python -m scripts.sweep_launch --only unscale --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024

# (name, overrides). Unscale: chunk size x loads in flight, and the 32 KiB table; its occupancy
# limit is already the most resident blocks, so more blocks/SM oversubscribes (16). Trimmed to
# about four minutes on an H200 with the optimizer grid; MIXPREC_UNSCALE_ILP=2 and
# MIXPREC_BLOCKS_PER_SM=4 are further candidates.
UNSCALE_GRID = [
    ("default", {}),
    ("chunk32k", {"MIXPREC_CHUNK_BYTES": 32 * KIB}),
    ("chunk64k", {"MIXPREC_CHUNK_BYTES": 64 * KIB}),
    ("ilp8", {"MIXPREC_UNSCALE_ILP": 8}),
    ("chunk32k_ilp8", {"MIXPREC_CHUNK_BYTES": 32 * KIB, "MIXPREC_UNSCALE_ILP": 8}),
    ("large_table", {"MIXPREC_UNSCALE_LARGE_TABLE": 1}),
    ("blocks16", {"MIXPREC_BLOCKS_PER_SM": 16}),
]
# The update kernels hold 5 blocks/SM by their register cap (MIXPREC_BLOCKS_PER_SM=8 would
# oversubscribe); small_table is the path an older driver takes.
OPTIMIZER_GRID = [
    ("default", {}),
    ("chunk32k", {"MIXPREC_CHUNK_BYTES": 32 * KIB}),
    ("chunk64k", {"MIXPREC_CHUNK_BYTES": 64 * KIB}),
    ("small_table", {"MIXPREC_LARGE_TABLE": 0}),
]
OPTIMIZER_VARIANTS = "ours-fp32,ours-bf16,ours-bf16-stochastic,ours-bf16-kahan"


def run(script: str, args: list[str], overrides: dict[str, int]) -> list[dict]:
    """Runs one benchmark under the overrides; returns its JSON rows (stderr shown on failure)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXPREC_")}
    env.update({k: str(v) for k, v in overrides.items()})
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        module = "benchmarks." + script.removesuffix(".py")
        proc = subprocess.run([sys.executable, "-m", module, *args, "--json", out.name],
                              check=False, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"# {script} failed under {overrides}:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return []
        return [json.loads(line) for line in Path(out.name).read_text().splitlines() if line.strip()]


def unscale_line(name: str, rows: list[dict], seconds: float) -> str:
    cells = [f"{r['model']}/{r['dtype']} {r['ours_pct_of_copy']:.1f}" for r in rows]
    worst = min((r["ours_pct_of_copy"] for r in rows), default=float("nan"))
    return f"unscale   {name:<14} min {worst:5.1f} %copy | " + "  ".join(cells) + f"  ({seconds:.0f} s)"


def optimizer_line(name: str, rows: list[dict], seconds: float) -> str:
    cells = [f"{r['model']}/{r['variant'].removeprefix('ours-')} {r['x_limit']:.3f}" for r in rows]
    worst = max((r["x_limit"] for r in rows), default=float("nan"))
    return f"optimizer {name:<14} max {worst:5.3f} x_limit | " + "  ".join(cells) + f"  ({seconds:.0f} s)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["unscale", "optimizer"], default=None)
    p.add_argument("--repeats", type=int, default=10, help="interleaved repeats per benchmark run")
    p.add_argument("--models", default="124M,1.5B")
    p.add_argument("--variants", default=OPTIMIZER_VARIANTS, help="bench_optimizer.py variants")
    args = p.parse_args()
    common = ["--models", args.models, "--repeats", str(args.repeats)]
    start = time.time()
    if args.only != "optimizer":
        for name, overrides in UNSCALE_GRID:
            t = time.time()
            rows = run("bench_unscale.py", common, overrides)
            print(unscale_line(name, rows, time.time() - t), flush=True)
    if args.only != "unscale":
        for name, overrides in OPTIMIZER_GRID:
            t = time.time()
            rows = run("bench_optimizer.py", [*common, "--variants", args.variants], overrides)
            print(optimizer_line(name, rows, time.time() - t), flush=True)
    print(f"# {time.time() - start:.0f} s in all; overrides per setting: see UNSCALE_GRID / OPTIMIZER_GRID")


if __name__ == "__main__":
    main()
