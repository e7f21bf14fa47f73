"""Does bf16 training without fp32 master weights keep up? Trains the same small GPT on the same
Markov-chain tokens under each mode and prints loss curves' end points:

  bf16-mixed       fp32 weights, bf16 autocast, AdamW                      (the reference)
  bf16-master      bf16 weights, fp32 master weights in the optimizer
  bf16-stochastic  bf16 weights only, stochastic rounding of each update
  bf16-kahan       bf16 weights + a bf16 compensation buffer
  bf16-nearest     bf16 weights only, round to nearest (updates below half an ulp are lost)
  compressed optimizer state (issue 15; its reference is bf16-master, fp32-master AdamW):
  bf16-remainder            bf16 weights + int16 remainder (= the fp32 master bit for bit)
  bf16-remainder-bf16m      ... and bf16 moments (stochastically rounded)
  bf16-remainder-8bit       ... and 8-bit block-wise moments
  bf16-stochastic-8bit      bf16 weights only, stochastic rounding, 8-bit moments
  bf16-remainder-fp8        bf16 weights + int16 remainder, fp8 (e4m3) block-scaled moments
  bf16-stochastic-fp8       bf16 weights only, stochastic rounding, fp8 moments
  fp8 linears (issue 16; its reference is bf16-mixed):
  fp8-mixed        bf16-mixed with the "fp8" rule for linear layers (the head stays bf16)

  python -m benchmarks.convergence_bf16 --device cpu --size tiny     # what CI's test runs
  python -m benchmarks.convergence_bf16 --device cuda --size small   # the GPU-sized run
  python -m benchmarks.convergence_bf16 --device cuda --size gpt-1b --modes bf16-mixed,fp8-mixed

Results: benchmarks/results/<machine>_convergence_bf16_<size>.jsonl by default.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import mixprec
from benchmarks.harness import JSON_HELP, results_path, write_jsonl
from mixprec.models import GPT, MarkovText

MODES = ["bf16-mixed", "bf16-master", "bf16-stochastic", "bf16-kahan", "bf16-nearest", "bf16-remainder",
         "bf16-remainder-bf16m", "bf16-remainder-8bit", "bf16-stochastic-8bit", "bf16-remainder-fp8",
         "bf16-stochastic-fp8", "fp8-mixed"]
MIXED = ("bf16-mixed", "fp8-mixed")  # fp32 weights under an autocast region
# mixprec.optim.AdamW's options per mode.
OPTIONS = {"bf16-mixed": {}, "fp8-mixed": {}, "bf16-master": {},
           "bf16-stochastic": {"master_weights": False, "rounding": "stochastic"},
           "bf16-kahan": {"master_weights": False, "rounding": "kahan"},
           "bf16-nearest": {"master_weights": False, "rounding": "nearest"},
           "bf16-remainder": {"master_weights": "remainder"},
           "bf16-remainder-bf16m": {"master_weights": "remainder", "moments": "bf16"},
           "bf16-remainder-8bit": {"master_weights": "remainder", "moments": "8bit"},
           "bf16-stochastic-8bit": {"master_weights": False, "rounding": "stochastic", "moments": "8bit"},
           "bf16-remainder-fp8": {"master_weights": "remainder", "moments": "fp8"},
           "bf16-stochastic-fp8": {"master_weights": False, "rounding": "stochastic", "moments": "fp8"}}
# layers, d, heads, vocab, ctx, batch, steps, lr (cosine to lr/10: the late small updates are
# where round-to-nearest loses them). gpt-1b is issue 16's bias-free model with its 16384 tokens
# a batch (so its linears meet the fp8 filter as in bench_fp8), as 32 x 512: the chain is sampled
# one position at a time. Its Markov chain uses the first DATA_VOCAB tokens (a 32768-token chain
# is a 4 GiB table).
SIZES = {"tiny": (2, 64, 4, 64, 32, 16, 300, 1e-3), "small": (6, 384, 6, 512, 128, 32, 1000, 3e-4),
         "gpt-1b": (16, 2048, 16, 32768, 512, 32, 300, 3e-4)}
DATA_VOCAB = 4096


def run(mode: str, device: str, size: str = "tiny", seed: int = 0, log_every: int = 50,
        steps: int | None = None) -> dict:
    layers, d, heads, vocab, ctx, batch, default_steps, lr = SIZES[size]
    steps = steps or default_steps
    torch.manual_seed(seed)
    model = GPT(vocab, ctx, layers, d, heads, bias=size != "gpt-1b").to(device)
    data = MarkovText(min(vocab, DATA_VOCAB), seed=seed, device=device)
    eval_x, eval_y = data.batch(min(64, batch), ctx)
    if mode not in MIXED:
        model = model.bfloat16()
    policy = mixprec.default_policy(torch.device(device).type)
    if mode == "fp8-mixed":
        mixprec.set_policy(model.head, policy)  # the head stays bf16 (as torchao's recipes keep it)
        policy = policy.override({"aten::linear": "fp8"})
    opt = mixprec.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, seed=seed, **OPTIONS[mode])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)

    def loss_of(x, y):
        with mixprec.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mode in MIXED, policy=policy):
            logits = model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = data.batch(batch, ctx)
        loss_of(x, y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                curve.append((step, float(loss_of(eval_x, eval_y))))
    return {"mode": mode, "size": size, "device": device, "steps": steps, "final_loss": curve[-1][1],
            "curve": curve, "entropy_floor": data.entropy(), "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the size's)")
    p.add_argument("--json", default=None, help=JSON_HELP)
    args = p.parse_args()
    rows = []
    for mode in args.modes.split(","):
        rows.append(run(mode, args.device, args.size, steps=args.steps))
        print(f"# {mode}: final loss {rows[-1]['final_loss']:.4f} in {rows[-1]['seconds']:.1f} s", flush=True)
    reference = next((r["final_loss"] for r in rows if r["mode"] == "bf16-mixed"), None)
    master = next((r["final_loss"] for r in rows if r["mode"] == "bf16-master"), None)
    for r in rows:
        r["vs_mixed"] = r["final_loss"] / reference if reference else None
        r["vs_master"] = r["final_loss"] / master if master else None
        print(json.dumps(r))
    print(f"\n{'mode':>22}  {'final loss':>10}  {'vs mixed':>8}  {'vs master':>9}  {'seconds':>7}"
          f"   (floor {rows[0]['entropy_floor']:.3f})")
    for r in rows:
        ratio = f"{r['vs_mixed']:.4f}" if r["vs_mixed"] else "-"
        vs_master = f"{r['vs_master']:.4f}" if r["vs_master"] else "-"
        print(f"{r['mode']:>22}  {r['final_loss']:10.4f}  {ratio:>8}  {vs_master:>9}  {r['seconds']:7.1f}")
    write_jsonl(rows, results_path(args.json, f"convergence_bf16_{args.size}", args.device))


if __name__ == "__main__":
    main()
