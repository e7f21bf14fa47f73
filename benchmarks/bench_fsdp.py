"""The optimizer step under FSDP2 (fully_shard, grads sharded as DTensors), ours vs torch's, on
GPT-2 parameter lists sharded over the ranks of one machine:

  torch  ShardedGradScaler.unscale_ + clip_grad_norm_ (global norm over DTensors)
         + AdamW(foreach=True).step via the scaler + update (fused=True fails under the sharded
         scaler in torch 2.11: its found_inf has shape [1], the fused kernel wants [])
  ours   mixprec.GradScaler.clip_grad_norm_ (one read + one all-reduce for norm and found_inf)
         + mixprec.optim.AdamW step + update

Both run in the same processes, interleaved (A B A B ...), timed with CUDA events on every rank
(GPU time: each call waits behind a GPU sleep so host enqueue time stays out); rank 0 prints the
medians. Each rank moves 32 B per local param element, so the limit is 32 B x params / world /
copy bandwidth.

  python -m benchmarks.bench_fsdp --world 2                    # NCCL, one GPU per rank
  python -m benchmarks.bench_fsdp --device cpu --model tiny    # gloo smoke test

Results: benchmarks/results/<machine>x<world>_fsdp.jsonl (e.g. h200x2_fsdp.jsonl) by default.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mixprec
from benchmarks.harness import (
    JSON_HELP,
    copy_fn,
    gpt2_shapes,
    results_path,
    summarize,
    time_interleaved,
    write_jsonl,
)

MODELS = {"tiny": (2, 64, 1000, 64), "124M": (12, 768), "1.5B": (48, 1600)}


class ParamList(torch.nn.Module):
    """A module that only holds parameters of the given shapes (one sub-module per tensor, so
    FSDP2 shards each like a layer)."""

    def __init__(self, shapes, device):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for shape in shapes:
            layer = torch.nn.Module()
            layer.weight = torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)
            self.layers.append(layer)


def make(variant: str, shapes, device: str, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    torch.manual_seed(0)
    model = ParamList(shapes, device)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    for p in params:  # sharded grads, as FSDP2's reduce-scatter leaves them (scaled by 2^16)
        p.grad = torch.randn_like(p) * (1e-3 * 2.0**16)
    dev = torch.device(device).type
    if variant == "torch":
        opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, foreach=True)
        scaler = ShardedGradScaler(dev, init_scale=2.0**16)
        scaler.scale(torch.ones((), device=device))

        def call():
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            scaler.step(opt)
            scaler.update()
        return call
    opt = mixprec.optim.AdamW(params, lr=3e-4, weight_decay=0.1)
    scaler = mixprec.GradScaler(dev, init_scale=2.0**16)
    scaler.scale(torch.ones((), device=device))

    def call():
        scaler.clip_grad_norm_(opt, 1.0)
        scaler.step(opt)
        scaler.update()
    return call


def worker(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda" if cuda else "cpu", (args.world,))
        shapes = gpt2_shapes(*MODELS[args.model])
        n = sum(torch.Size(s).numel() for s in shapes)
        fns = {v: make(v, shapes, device, mesh) for v in ("torch", "ours")}
        fns["copy"] = copy_fn(device, 1 << 30 if cuda else 16 << 20)
        stats = {k: summarize(v) for k, v in time_interleaved(fns, args.repeats, device).items()}
        copy_bytes = 2 * (1 << 30 if cuda else 16 << 20)
        copy_gbps = copy_bytes / stats["copy"]["median"] / 1e6
        limit_ms = 32 * n / args.world / copy_gbps / 1e6
        rows = [{"model": args.model, "world": args.world, "rank": rank, "variant": v, "ms": stats[v]["median"],
                 "spread": stats[v]["spread"], "x_limit": stats[v]["median"] / limit_ms,
                 "x_torch": stats[v]["median"] / stats["torch"]["median"], "limit_ms": limit_ms,
                 "copy_gbps": copy_gbps, "params": n, "torch_version": torch.__version__,
                 "device_name": torch.cuda.get_device_name(rank) if cuda else "cpu"} for v in ("torch", "ours")]
        everyone = [None] * args.world
        dist.all_gather_object(everyone, rows)
        if rank == 0:
            flat = [r for per_rank in everyone for r in per_rank]
            write_jsonl(flat, results_path(args.json, "fsdp", args.device, args.world))
            for v in ("torch", "ours"):
                ms = [r["ms"] for r in flat if r["variant"] == v]
                ratio = [r["x_torch"] for r in flat if r["variant"] == v]
                print(f"{args.model} FSDP2 x{args.world} {v:>5}: {statistics.median(ms):8.3f} ms "
                      f"(ranks {min(ms):.3f}-{max(ms):.3f}), x torch {statistics.median(ratio):.2f}, "
                      f"x limit {statistics.median(ms) / limit_ms:.2f} (limit {limit_ms:.3f} ms)")
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--model", default="124M", choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None, help=JSON_HELP)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
