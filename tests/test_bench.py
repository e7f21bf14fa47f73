"""mixprec.bench: the peak memory it reports (exact on the CPU, or "not measured"), the JSON figures
of a short CPU run, and the warning for rows whose timings spread too far to compare."""
from __future__ import annotations

import json

import pytest
import torch

from mixprec import bench

MiB = 1 << 20


def test_cpu_peak_memory_is_the_peak_of_tensor_bytes():
    """4 MiB + 1 MiB live, the 4 MiB freed, 2 MiB more: the peak is 5 MiB, to the byte. Freeing a
    tensor from before the block does not lower the figure (its size was never counted)."""
    older = torch.empty(MiB // 4)
    with bench.peak_memory(torch.device("cpu")) as peak:
        a = torch.empty(MiB)
        b = torch.empty(MiB // 4)
        del a, older
        c = torch.empty(MiB // 2)
    assert peak.bytes == 5 * MiB
    assert b.numel() + c.numel() > 0
    with bench.peak_memory(torch.device("cpu")) as peak:
        pass
    assert peak.bytes == 0


def test_peak_memory_not_measured_when_the_profiler_lacks_allocation_events(monkeypatch):
    monkeypatch.delattr(torch._C._profiler, "_ExtraFields_Allocation")
    with bench.peak_memory(torch.device("cpu")) as peak:
        torch.empty(MiB)
    assert peak.bytes is None
    assert bench._fmt_bytes(None) == "not measured"


@pytest.fixture(scope="module")
def cpu_result():
    return bench.run_bench(["32-true", "bf16-true"], model="mlp", steps=2, rounds=2, warmup=0,
                           device="cpu", progress=False)


def test_cpu_run_gives_every_figure(cpu_result, tmp_path):
    result = cpu_result
    assert result["device"] == "cpu" and result["model"] == "mlp" and result["unit"] == "samples"
    assert result["steps"] == 2 and result["rounds"] == 2 and result["steps_per_round"] == 1
    assert result["peak_memory_from"] == bench.PEAK_MEMORY_FROM["cpu"]
    assert result["memory_saving_of"] == "peak_memory_bytes"
    assert isinstance(result["warnings"], list)
    assert [r["name"] for r in result["rows"]] == ["32-true", "bf16-true"]
    keys = {"name", "precision", "impl", "optimizer", "step_ms", "step_ms_min", "step_ms_max",
            "spread", "step_ms_rounds", "samples_per_s", "peak_memory_bytes", "held_bytes",
            "final_loss", "skipped_steps", "steps_total", "timed_steps", "speedup_vs_32",
            "memory_saving_vs_32", "speed_vs_torch"}
    for row in result["rows"]:
        assert keys <= set(row)
        assert row["step_ms_min"] <= row["step_ms"] <= row["step_ms_max"]
        # weights, grads and optimizer state are built inside the measured block and kept
        assert row["peak_memory_bytes"] >= row["held_bytes"] > 0
        assert row["steps_total"] == 3 and row["timed_steps"] == 2
    base, low = result["rows"]
    assert base["speedup_vs_32"] == 1.0 and base["memory_saving_vs_32"] == 0.0
    assert low["memory_saving_vs_32"] == pytest.approx(
        1 - low["peak_memory_bytes"] / base["peak_memory_bytes"])
    path = tmp_path / "bench.json"
    bench.write_json(result, str(path))
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    table = bench.format_table(result)
    assert "peak memory: torch.profiler" in table and "0 B |" not in table


def test_mlp_peak_memory_counts_weights_grads_and_adam_state(cpu_result):
    """32-true MLP with mixprec AdamW: at the step, fp32 weights + grads + two moments are live,
    4 x 4 bytes per parameter at least."""
    work = bench.make_workload("mlp", torch.device("cpu"))
    params = sum(p.numel() for p in work.model.parameters())
    assert cpu_result["rows"][0]["peak_memory_bytes"] >= 16 * params


def test_rows_with_a_wide_spread_are_flagged():
    rows = [{"name": "steady", "spread": 0.49}, {"name": "noisy", "spread": 47.37}]
    warnings = bench.noisy_rows(rows)
    assert len(warnings) == 1 and warnings[0].startswith("noisy: spread 4737 %")
    assert bench.noisy_rows(rows, limit=0.1)[0].startswith("steady")


def test_table_prints_the_warnings_and_unmeasured_memory(cpu_result):
    result = json.loads(json.dumps(cpu_result))
    result["rows"][1]["spread"] = 3.0
    result["rows"][1]["peak_memory_bytes"] = None
    result["warnings"] = bench.noisy_rows(result["rows"])
    lines = bench.format_table(result).splitlines()
    assert "| not measured |" in lines[4]
    assert lines[-1].startswith("warning: bf16-true: spread 300 %")
