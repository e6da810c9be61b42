"""`lora-train {train,caption,bench,demo}` (or `python -m lora_train ...`): the headless command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__, bench_caption, bench_gpu, bench_train, cli_caption, cli_demo, cli_train


def _program_name() -> str:
    """`lora-train` when run as the installed command, `python -m lora_train` otherwise."""
    return "lora-train" if Path(sys.argv[0]).name.startswith("lora-train") else "python -m lora_train"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_program_name(),
                                     description="Caption images and train Stable Diffusion LoRAs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    cli_caption.add_parser(subparsers)
    cli_train.add_parser(subparsers)
    bench = subparsers.add_parser("bench", help="benchmarks (images/s, ms/step, memory)")
    bench_commands = bench.add_subparsers(dest="bench", required=True)
    bench_caption.add_parser(bench_commands)
    bench_train.add_parser(bench_commands)
    bench_gpu.add_parser(bench_commands)
    cli_demo.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
