"""mixprec.fit (`mixprec bench --fit`): the search finds the largest depth that fits, probes run
in fresh processes and build the model in its storage dtype, the CLI prints the table."""
import torch

from mixprec import fit
from mixprec.cli import main


def test_search_brackets_the_largest_depth(monkeypatch):
    """With a probe that fits up to depth 37 (peak linear in depth, out of memory beyond), the
    two small probes predict 37 and a few more bracket it."""
    calls = []

    def fake(family, mode, depth, device, tiny):
        calls.append(depth)
        return None if depth > 37 else {"params": 1000 * depth, "peak_bytes": 100 + 10 * depth, "depth": depth}

    monkeypatch.setattr(fit, "_probe_in_process", fake)
    result = fit.find_largest("gpt", "bf16-true", "cpu", memory_limit=475)
    assert (result.depth, result.params) == (37, 37000)
    assert 38 in calls and result.probes == len(calls) <= 6


def test_probe_builds_in_the_storage_dtype_in_a_fresh_process():
    result = fit._probe_in_process("gpt", "bf16-true-remainder-8bit", 2, "cpu", True)
    model, _ = fit.build("gpt", 2, torch.device("cpu"), torch.bfloat16, tiny=True)
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any("bias" in name for name, _ in model.named_parameters())  # the family is bias-free
    assert result["peak_bytes"] > 0


def test_bench_fit_cli_prints_the_table(capsys):
    # A limit no probe fits under: one probe (a fresh process) and a row of depth 0.
    code = main(["bench", "--fit", "--tiny", "--device", "cpu", "--fit-modes", "bf16-true-stochastic-8bit-in-backward",
                 "--memory-limit", "0.0000001", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "bf16-true-stochastic-8bit-in-backward" in out and "largest gpt" in out
    assert main(["bench", "--fit", "--model", "mlp", "--device", "cpu"]) == 2


def test_fp8_moments_mode_probes_on_the_cpu():
    """The fp8-moment mode completes its probe's training steps (tiny model, fresh process) with
    the parameter count of the 8-bit one."""
    fp8 = fit._probe_in_process("gpt", "bf16-true-remainder-fp8-in-backward", 2, "cpu", True)
    eight = fit._probe_in_process("gpt", "bf16-true-remainder-8bit", 2, "cpu", True)
    assert fp8["params"] == eight["params"] and fp8["peak_bytes"] > 0
