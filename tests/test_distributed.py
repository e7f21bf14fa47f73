"""mixprec under torch.distributed, two CPU processes with gloo (CI) or NCCL on two GPUs:
DDP (grads replicated) and FSDP2 (grads sharded as DTensors). An overflow on one rank must skip
the step on every rank, clipping must use the global norm, and the result must equal one
process training on the whole batch."""
from __future__ import annotations

import gc
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mixprec
import mixprec.distributed

STEPS, OVERFLOW_STEP, WORLD = 6, 2, 2
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


def model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 34), torch.nn.Tanh(), torch.nn.Linear(34, 4))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 16, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(STEPS)]
    return model, batches


def train(model, opt, scaler, batches, rank, world, inject):
    """The loop every run shares; `inject(step, model, x)` may plant an overflow."""
    norms = []
    for step, (x, y) in enumerate(batches):
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        x = inject(step, model, x.clone(), "input")[rows]
        loss = torch.nn.functional.mse_loss(model(x), y[rows])
        scaler.scale(loss).backward()
        inject(step, model, None, "grad")
        norms.append(float(scaler.clip_grad_norm_(opt, 0.5)))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return norms


def worker(rank, port, mode, backend, out, options=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    try:
        _train_and_save(rank, mode, backend, out, options or {})
    finally:
        # DDP's reducer dies with _train_and_save's frame, before its process group: destroyed
        # the other way round, a gloo rank now and then aborted at exit ("terminate called
        # without an active exception", after its results were saved).
        gc.collect()
        dist.destroy_process_group()


def _train_and_save(rank, mode, backend, out, options):
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    model, batches = model_and_batches()
    model = model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(torch.device(device).type, (WORLD,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    opt = mixprec.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1, **options)
    scaler = mixprec.GradScaler(torch.device(device).type, init_scale=2.0**10)

    def inject(step, m, x, where):
        if step != OVERFLOW_STEP or rank != 1:
            return x
        if where == "input" and mode == "ddp":  # DDP's all-reduce spreads it to every rank
            x[-1, 0] = math.inf
        if where == "grad" and mode == "fsdp2":  # lands in rank 1's shard only
            from mixprec.distributed import local
            local(next(iter(m.parameters())).grad).view(-1)[0] = math.inf
        return x

    norms = train(wrapped, opt, scaler, batches, rank, WORLD, inject)
    # The optimizer's checkpoint (DTensor state under FSDP2) loads into a fresh optimizer.
    reloaded = mixprec.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1, **options)
    reloaded.load_state_dict(opt.state_dict())
    for p in wrapped.parameters():
        for key, value in opt.state[p].items():
            assert type(reloaded.state[p][key]) is type(value), key
            assert torch.equal(mixprec.distributed.local(reloaded.state[p][key]),
                               mixprec.distributed.local(value)), key
    params = [(p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).cpu() for p in wrapped.parameters()]
    state = scaler.state_dict()
    shared = [state]
    dist.broadcast_object_list(shared, src=0)  # "save on rank 0, load everywhere"
    fresh = mixprec.GradScaler(torch.device(device).type)
    fresh.load_state_dict(shared[0])
    absmax = [(mixprec.distributed.local(p).numel(), opt.state[p]["exp_avg_absmax"].numel())
              for p in wrapped.parameters() if "exp_avg_absmax" in opt.state[p]]
    torch.save({"norms": norms, "params": [p.clone() for p in params], "state": state, "absmax": absmax,
                "loaded": fresh.state_dict(), "stats": scaler.stats()}, os.path.join(out, f"{rank}.pt"))


def reference(mode, options=None):
    """One process, the whole batch, the same overflow."""
    model, batches = model_and_batches()
    opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **(options or {}))
    scaler = mixprec.GradScaler("cpu", init_scale=2.0**10)

    def inject(step, m, x, where):
        if step == OVERFLOW_STEP and where == ("input" if mode == "ddp" else "grad"):
            if where == "input":
                x[-1, 0] = math.inf
            else:
                next(iter(m.parameters())).grad.view(-1)[-1] = math.inf
        return x

    norms = train(model, opt, scaler, batches, 0, 1, inject)
    return norms, [p.detach() for p in model.parameters()], scaler.stats()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BACKENDS = ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD,
    reason="NCCL needs 2 GPUs (run on a 2-GPU machine)"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_every_rank_skips_together_and_matches_one_process(mode, backend, tmp_path):
    mp.spawn(worker, args=(free_port(), mode, backend, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    ref_norms, ref_params, ref_stats = reference(mode)
    for r in ranks:
        assert r["stats"]["skipped_steps"] == ref_stats["skipped_steps"] == 1
        assert r["stats"]["scale"] == ref_stats["scale"]
        assert r["state"] == ranks[0]["state"] and r["loaded"] == ranks[0]["state"]
        for step, (got, want) in enumerate(zip(r["norms"], ref_norms)):
            if step == OVERFLOW_STEP:
                assert not math.isfinite(got) and not math.isfinite(want)
            else:  # the global norm, not this rank's
                assert got == pytest.approx(want, rel=1e-5), step
        for got, want in zip(r["params"], ref_params):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("moments", ["8bit", "fp8"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_8bit_moments_under_ddp_and_fsdp2(mode, backend, moments, tmp_path):
    """8-bit (and fp8) moments across ranks: every rank skips the overflow step together and
    reloads its checkpoint. Each rank quantizes its own shard in blocks of 256 (a block never
    straddles two shards: absmax has ceil(shard / 256) entries). Under DDP the result is one
    process's bit for bit in value; under FSDP2 the blocks differ from one process's, so it agrees
    within the format's rounding: each step's update (lr 1e-2) moves by a few % of lr with 8-bit
    moments (the dynamic map's step near a block's top is 1/64) and up to ~10 % with fp8's 1/8."""
    options = {"moments": moments}
    mp.spawn(worker, args=(free_port(), mode, backend, str(tmp_path), options), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    _, ref_params, ref_stats = reference(mode, options)
    for r in ranks:
        assert r["stats"]["skipped_steps"] == ref_stats["skipped_steps"] == 1
        assert r["absmax"] and all(blocks == (n + 255) // 256 for n, blocks in r["absmax"])
        for got, want in zip(r["params"], ref_params):
            if mode == "ddp":
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=2e-3 if moments == "8bit" else 5e-3)


def _fp8_forward_backward_and_save(rank, out):
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 16))
    x = torch.randn(8, 64)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    policy = mixprec.default_policy("cpu").override({F.linear: "fp8"})
    with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy):
        y = model(x)
    y.float().sum().backward()
    grads = [p.grad.full_tensor() for p in model.parameters()]
    torch.save({"y": y.detach(), "grads": grads}, os.path.join(out, f"fp8_{rank}.pt"))


def fp8_worker(rank, port, out):
    """FSDP2 over two ranks, forward and backward under the fp8 rule: the rule casts the gathered
    (whole) weight, so each rank's output equals one process's on its rows."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _fp8_forward_backward_and_save(rank, out)
    finally:
        # the sharded model dies with the helper's frame, before its process group (see worker)
        gc.collect()
        dist.destroy_process_group()


def test_fp8_rule_under_fsdp2_casts_the_gathered_weight(tmp_path):
    import torch.nn.functional as F

    mp.spawn(fp8_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 16))
    x = torch.randn(8, 64)
    policy = mixprec.default_policy("cpu").override({F.linear: "fp8"})
    with mixprec.autocast("cpu", dtype=torch.bfloat16, policy=policy):
        y = model(x)
    y.float().sum().backward()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"fp8_{r}.pt")
        assert torch.equal(got["y"], y.detach())
        for g, p in zip(got["grads"], model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
