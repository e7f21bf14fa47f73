"""The `mixprec` command (also `python -m mixprec`): demo, doctor, run, bench."""
from __future__ import annotations

import argparse
import os
import runpy
import sys

from mixprec.precision_modes import ENV_VAR, parse_precision, valid_precisions


def _precision_arg(value: str) -> str:
    try:
        return parse_precision(value, source="--precision")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _precision_list(value: str) -> list[str]:
    try:
        names = [parse_precision(p, source="--precisions") for p in value.split(",") if p.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not names:
        raise argparse.ArgumentTypeError(f"--precisions={value!r} names no precision; expected a "
                                         f"comma-separated list of {', '.join(valid_precisions())}")
    return names


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def _device_error(command: str, device: str | None) -> str | None:
    """Why `device` cannot run here (None when it can)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return (f"mixprec {command}: --device cuda, but torch sees no CUDA GPU "
                    "(torch.cuda.is_available() is False); use --device cpu")
    return None


def run_script(script: str, args: list[str], precision: str, module: bool = False) -> int:
    """Run `script` (a path, or a module name with module=True) in this process as __main__,
    with sys.argv = [script, *args] and $MIXPREC_PRECISION set, so mixprec.Precision() in it
    picks the precision. Returns the script's exit status; argv and the environment are restored."""
    saved_argv, saved_env = sys.argv[:], os.environ.get(ENV_VAR)
    saved_path0 = sys.path[0] if sys.path else None
    os.environ[ENV_VAR] = precision
    sys.argv = [script, *args]
    try:
        if module:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
        else:
            if not os.path.exists(script):
                print(f"mixprec run: no such script: {script}", file=sys.stderr)
                return 2
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` does
            runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as e:
        code = e.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved_argv
        if not module and sys.path and sys.path[0] != saved_path0:
            sys.path.pop(0)
        if saved_env is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved_env


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixprec", description="mixed-precision training for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a short fp16 training run with mixprec.GradScaler")
    demo.add_argument("--steps", type=_positive_int, default=300, help="training steps (default 300)")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None,
                      help="default: cuda if available, else cpu")
    commands.add_parser("doctor", help="what this machine supports and which precision to use")

    run = commands.add_parser(
        "run", help="run a training script with a precision (read by mixprec.Precision())",
        description=f"Runs SCRIPT in this process with ${ENV_VAR} set to the precision; "
                    "mixprec.Precision() with no argument reads it.")
    run.add_argument("--precision", type=_precision_arg, default="32-true",
                     help=f"one of {', '.join(valid_precisions())} (default 32-true)")
    run.add_argument("-m", dest="module", action="store_true", help="SCRIPT is a module name (python -m)")
    run.add_argument("script")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")

    bench = commands.add_parser(
        "bench", help="train a built-in model under each precision and compare speed and memory",
        description="Times every variant interleaved in one process (median and spread over rounds).")
    bench.add_argument("--precisions", type=_precision_list, default=None,
                       help="comma-separated (default 32-true,16-mixed,bf16-mixed,bf16-true)")
    bench.add_argument("--model", choices=["gpt", "mlp", "cnn", "gpt-1b", "vit"], default="gpt",
                       help="gpt-1b: issue 16's fp8 configuration; vit only with --fit")
    bench.add_argument("--fit", action="store_true",
                       help="find the largest model (gpt or vit, scaled by depth) whose training step fits on "
                            "this device, per optimizer-state mode, beside torch.amp bf16-mixed (mixprec.fit)")
    bench.add_argument("--fit-modes", default=None,
                       help="comma-separated fit modes (default: all; see mixprec.fit.MODES)")
    bench.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                       help="--fit: a probe fits when its peak is under this (default: the device's free memory)")
    bench.add_argument("--tiny", action="store_true", help="--fit: tiny shapes (a dry run on the CPU)")
    bench.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 100 on CUDA, 20 on CPU)")
    bench.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10 on CUDA, 5 on CPU)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 3 CUDA, 1 CPU)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    bench.add_argument("--compare-torch", action="store_true",
                       help="also time torch's own recipe for 32-true/16-mixed/bf16-mixed in the same run")
    bench.add_argument("--batch", type=int, default=None, help="batch size (default: the model's size for the device)")
    bench.add_argument("--lr", type=float, default=3e-4)
    bench.add_argument("--clip", type=float, default=1.0, help="grad-norm clip in every loop (0: none)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--plot", metavar="PNG", help="write bar charts (needs matplotlib)")
    bench.add_argument("--json", metavar="PATH", help="write the raw figures as JSON")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _fit(args: argparse.Namespace) -> int:
    from mixprec import bench, fit

    if args.model not in fit.FAMILIES:
        print(f"mixprec bench --fit: --model must be one of {list(fit.FAMILIES)}", file=sys.stderr)
        return 2
    modes = args.fit_modes.split(",") if args.fit_modes else list(fit.MODES)
    if args.precisions:  # keep the modes of the precisions asked for
        modes = [m for m in modes if any(m.removeprefix("torch-").startswith(p) for p in args.precisions)]
    if args.plot:
        try:
            bench.require_matplotlib()
        except bench.MissingDependency as e:
            print(f"mixprec bench: {e}", file=sys.stderr)
            return 2
    limit = None if args.memory_limit is None else int(args.memory_limit * 2**30)
    try:
        result = fit.run_fit(args.model, modes, args.device, tiny=args.tiny, memory_limit=limit,
                             progress=not args.no_progress)
    except ValueError as e:
        print(f"mixprec bench --fit: {e}", file=sys.stderr)
        return 2
    print(fit.format_fit(result))
    if args.json:
        bench.write_json(result, args.json)
        print(f"figures written to {args.json}")
    if args.plot:
        fit.write_plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mixprec import bench

    error = _device_error("bench", args.device)
    if error:
        print(error, file=sys.stderr)
        return 2
    if args.fit:
        return _fit(args)
    if args.model == "vit":
        print("mixprec bench: --model vit is for --fit", file=sys.stderr)
        return 2
    if args.plot:
        try:
            bench.require_matplotlib()  # fail before the run, not after it
        except bench.MissingDependency as e:
            print(f"mixprec bench: {e}", file=sys.stderr)
            return 2
    try:
        result = bench.run_bench(
            precisions=args.precisions or bench.DEFAULT_PRECISIONS, model=args.model, steps=args.steps,
            rounds=args.rounds, warmup=args.warmup, device=args.device, compare_torch=args.compare_torch,
            lr=args.lr, clip=args.clip, seed=args.seed, progress=not args.no_progress, batch=args.batch)
    except ValueError as e:
        print(f"mixprec bench: {e}", file=sys.stderr)
        return 2
    print(bench.format_table(result))
    if args.json:
        bench.write_json(result, args.json)
        print(f"figures written to {args.json}")
    if args.plot:
        bench.write_plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    error = _device_error("demo", args.device)
    if error:
        print(error, file=sys.stderr)
        return 2
    from mixprec.demo import run_demo

    run_demo(steps=args.steps, device=args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parsing, --help, doctor and run need no compiled kernels; demo and bench load them (a
    missing build is reported with its fix, exit status 1)."""
    from mixprec._extension import ExtensionUnavailable

    args = _parser().parse_args(argv)
    if args.command == "doctor":
        from mixprec.doctor import main as doctor

        doctor()
        return 0
    if args.command == "run":
        return run_script(args.script, args.args, args.precision, module=args.module)
    try:
        return _demo(args) if args.command == "demo" else _bench(args)
    except ExtensionUnavailable as e:
        print(f"mixprec {args.command}: {e}", file=sys.stderr)
        return 1
