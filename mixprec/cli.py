"""The `mixprec` command (also `python -m mixprec`)."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixprec", description="mixed-precision training for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a short fp16 training run with mixprec.GradScaler")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None,
                      help="default: cuda if available, else cpu")
    commands.add_parser("doctor", help="what this machine supports and which precision to use")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from mixprec.doctor import main as doctor

        doctor()
    if args.command == "demo":
        from mixprec.demo import run_demo

        run_demo(steps=args.steps, device=args.device)
    return 0
