"""The `mixprec` command: run (precision through the environment), bench (every model, JSON,
plot or the clear error without matplotlib), demo, and a cold start: --help, doctor and run on a
source checkout without a build or a compiler."""
import json
import os
import subprocess
import sys

import pytest
import torch
from test_doctor import copy_package, run_cold

from mixprec.cli import main
from mixprec.precision_modes import ENV_VAR

SCRIPT = """
import sys, mixprec.precision
prec = mixprec.precision.Precision()
open(sys.argv[1], "w").write(prec.precision + " " + " ".join(sys.argv[2:]))
if "--fail" in sys.argv:
    sys.exit(3)
"""


def test_run_sets_the_precision_and_argv(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    script, out = tmp_path / "train.py", tmp_path / "seen.txt"
    script.write_text(SCRIPT)
    argv = sys.argv[:]
    assert main(["run", "--precision", "bf16-mixed", str(script), str(out), "--lr", "3"]) == 0
    assert out.read_text() == "bf16-mixed --lr 3"
    assert ENV_VAR not in os.environ and sys.argv == argv  # restored
    assert main(["run", "--precision", "64", str(script), str(out), "--fail"]) == 3
    assert out.read_text() == "64-true --fail"


def test_run_as_console_command(tmp_path):
    script, out = tmp_path / "train.py", tmp_path / "seen.txt"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    subprocess.run([sys.executable, "-m", "mixprec", "run", "--precision", "16-true", str(script), str(out), "x"],
                   check=True, env=env, timeout=120)
    assert out.read_text() == "16-true x"


def test_run_rejects_an_unknown_precision(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["run", "--precision", "fp8", str(tmp_path / "t.py")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--precision='fp8' is not a precision" in err and "'bf16-true'" in err
    assert main(["run", str(tmp_path / "missing.py")]) == 2


@pytest.mark.parametrize("model", ["gpt", "mlp", "cnn"])
def test_bench_every_model_writes_json(model, tmp_path, capsys):
    path = tmp_path / "bench.json"
    precisions = "32-true,16-mixed,bf16-mixed" if model == "gpt" else "32-true,bf16-mixed,bf16-true"
    assert main(["bench", "--model", model, "--precisions", precisions, "--steps", "2", "--warmup", "1",
                 "--device", "cpu", "--json", str(path)] + (["--compare-torch"] if model == "gpt" else [])) == 0
    captured = capsys.readouterr()
    result = json.loads(path.read_text())
    names = [r["name"] for r in result["rows"]]
    if model == "gpt":
        assert names == ["32-true", "torch 32-true", "16-mixed", "torch.amp 16-mixed", "bf16-mixed",
                         "torch.amp bf16-mixed"]
        assert result["unit"] == "tokens"
    else:
        assert names == ["32-true", "bf16-mixed", "bf16-true"] and result["unit"] == "samples"
    assert result["steps"] == 2 and result["rounds"] == 2 and result["model"] == model
    for row in result["rows"]:
        assert len(row["step_ms_rounds"]) == 2 and row["step_ms"] > 0 and row["held_bytes"] > 0
        assert row["final_loss"] == row["final_loss"] and row["skipped_steps"] >= 0
        assert row["steps_total"] == 3  # warm-up + timed
    base = result["rows"][0]
    assert base["speedup_vs_32"] == 1.0 and base["memory_saving_vs_32"] == 0.0
    if model == "gpt":
        ours, theirs = result["rows"][2], result["rows"][3]
        assert ours["speed_vs_torch"] == pytest.approx(theirs["step_ms"] / ours["step_ms"])
        assert ours["final_loss"] == pytest.approx(theirs["final_loss"], rel=1e-2)
    assert "| variant |" in captured.out and "speed-up vs 32-true" in captured.out
    assert "[" in captured.err and "]" in captured.err  # the progress bar


def test_bench_plot_or_the_clear_error(tmp_path, capsys, monkeypatch):
    png = tmp_path / "bench.png"
    args = ["bench", "--model", "mlp", "--precisions", "32-true,bf16-mixed", "--steps", "1", "--device", "cpu",
            "--plot", str(png), "--no-progress"]
    try:
        import matplotlib  # noqa: F401
        has_matplotlib = True
    except ImportError:
        has_matplotlib = False
    if has_matplotlib:
        assert main(args) == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(args[:-3] + ["--plot", str(tmp_path / "other.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install 'mixprec[bench]'" in err
    assert not (tmp_path / "other.png").exists()


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--precisions", "32-true,fp8"])
    assert "--precisions='fp8' is not a precision" in capsys.readouterr().err
    assert main(["bench", "--precisions", "32,32-true", "--steps", "1", "--device", "cpu"]) == 2
    assert "names a mode twice" in capsys.readouterr().err


def test_bench_rejects_an_empty_precision_list(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--precisions", " , "])
    assert info.value.code == 2
    assert "--precisions=' , ' names no precision; expected a comma-separated list of 32-true" in capsys.readouterr().err


def test_demo_rejects_bad_arguments(capsys, monkeypatch):
    for steps in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as info:
            main(["demo", "--steps", steps])
        assert info.value.code == 2
        assert f"argument --steps: expected a whole number >= 1, got '{steps}'" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    for command in ("demo", "bench"):
        assert main([command, "--device", "cuda"]) == 2
        assert f"mixprec {command}: --device cuda, but torch sees no CUDA GPU" in capsys.readouterr().err
    from mixprec.demo import run_demo

    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        run_demo(steps=0)


def test_demo_says_skipped_steps_are_expected(capsys):
    assert main(["demo", "--steps", "10", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "skipped steps are expected: fp16 loss scaling skips a step when the gradients overflow" in out
    assert "10/10 loss" in out and "done in" in out


def test_cold_start_without_a_build_or_a_compiler(tmp_path):
    """--help, argument errors and `run` work on a source checkout with no built extension and no
    compiler on PATH (doctor too: tests/test_doctor.py); demo, which needs kernels, says why not."""
    copy_package(tmp_path)
    out = run_cold(tmp_path, "--help")
    assert out.returncode == 0 and "usage: mixprec" in out.stdout and "doctor" in out.stdout, out.stderr[-3000:]
    out = run_cold(tmp_path, "run", "--precision", "fp8", "x.py")
    assert out.returncode == 2 and "--precision='fp8' is not a precision" in out.stderr
    script = tmp_path / "train.py"
    script.write_text("import os, mixprec, mixprec._extension as e\n"
                      "from mixprec.precision_modes import MODES, parse_precision\n"
                      "assert not e.loaded()\n"
                      "print('mode', MODES[parse_precision(os.environ['MIXPREC_PRECISION'])].dtype)\n")
    out = run_cold(tmp_path, "run", "--precision", "bf16", str(script))
    assert out.returncode == 0 and "mode torch.bfloat16" in out.stdout, out.stderr[-3000:]
    out = run_cold(tmp_path, "demo", "--steps", "1")
    assert out.returncode == 1
    assert "mixprec demo: mixprec's compiled extension (mixprec._C) is not built and cannot be built here" in out.stderr
    assert "a C++ compiler ('c++' is not on PATH)" in out.stderr and "pip install --no-build-isolation -e ." in out.stderr
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").iterdir()), "something was built"
