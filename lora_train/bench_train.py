"""Training-step benchmark (`python -m lora_train bench train`): ours vs. the bare UNet step vs. a reference loop.

One command runs, on the same model, images and settings, the loops of `lora_train.bench_loops` (floor, ours,
reference; with `--fast` also ours with the fast-path settings, with `--compile` ours with torch.compile), each
in a fresh process so that peak memory is per row, in interleaved rounds (`lora_train.bench_rounds`), and prints
ms/step (median over the rounds of each round's median after warm-up) with its spread, it/s, peak memory, the
ratios ours/floor and ours/reference taken within each round, and whether they hold to ±5 %. The cli row is the
command line's whole run from the checkpoint file (tiny and sd15 are written as one first; not for sdxl), so its
peak memory, beside the floor's, is what `lora-train train` takes.
On the CPU the peak is the process's peak RSS (everything: Python, torch, weights, activations); on a GPU it is
`torch.cuda.max_memory_allocated`. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Dict, List

from .bench_loops import FAST_PATH, BenchSettings, RowResult, run_row
from .bench_models import BENCH_ARCHITECTURES, write_sd15_file
from .bench_rounds import RowRounds, ratio, run_rounds, verdict
from .tiny import build_tiny_checkpoint

GIB = 1024 ** 3
CHECKPOINTING = {False: "", True: ", gradient checkpointing"}


class BenchRowError(RuntimeError):
    """A row's process died (killed for memory, most often); the message names the row."""


def run_in_process(name: str, settings: BenchSettings) -> RowResult:
    """Runs one loop in a fresh spawned process, so its peak memory is its own.

    Raises:
        BenchRowError: the process died before it reported (a killed pool worker would otherwise hang).
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(run_row, name, settings).result()
        except BrokenProcessPool:
            raise BenchRowError(f"the {name} row's process died before it finished (out of memory?); free "
                                "memory or try a smaller --model, --resolution or --batch-size") from None


def format_table(results: Dict[str, RowRounds], memory: str) -> str:
    lines = [f"{'loop':<10} {'ms/step':>9} {'spread':>7} {'it/s':>7} {memory:>14}  {'vs floor':>8}  first/last loss"]
    for name, row in results.items():
        first = row.first
        extra = f"  (first step {first.setup_seconds:.1f} s)" if first.setup_seconds else ""
        lines.append(f"{name:<10} {row.median_ms:>9.1f} {row.spread:>6.1%} {1000 / row.median_ms:>7.2f} "
                     f"{row.peak_bytes / GIB:>10.2f} GiB  {ratio(results, name, 'floor').median:>7.2f}x  "
                     f"{first.losses[0]:.4f} / {first.losses[-1]:.4f}{extra}")
    return "\n".join(lines)


def format_ratios(results: Dict[str, RowRounds]) -> str:
    ours = results["ours"]
    ratios = {"ours/floor": ratio(results, "ours", "floor"), "ours/reference": ratio(results, "ours", "reference")}
    lines = [f"{label:<15} time {ratios[label].describe()}  memory "
             f"{ours.peak_bytes / results[other].peak_bytes:.3f}"
             for label, other in (("ours/floor", "floor"), ("ours/reference", "reference"))]
    if "cli" in results:
        cli = results["cli"]
        lines.append(f"{'cli/floor':<15} time {ratio(results, 'cli', 'floor').describe()}  memory "
                     f"{cli.peak_bytes / results['floor'].peak_bytes:.3f} (the whole command, from the file)")
    for name in ("fast", "compiled"):
        if name in results:
            drift = max(abs(a - b) for a, b in zip(results[name].first.losses, ours.first.losses))
            lines.append(f"{name + '/floor':<15} time {ratio(results, name, 'floor').describe()}  "
                         f"(max |loss {name} - loss ours| {drift:.2e})")
    return "\n".join(lines + [verdict(ratios)])


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers `train` on a subparsers object (the caller puts it under `bench`)."""
    parser = subparsers.add_parser("train", help="ms/step and memory: ours vs. the bare UNet step vs. reference",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny",
                        help="tiny: seconds (CI smoke); sd15 / sdxl: the SD1.5 / SDXL architecture, randomly "
                             "initialised; or an SD1/SD2/SDXL .safetensors checkpoint or diffusers folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--resolution", type=int, default=0,
                        help="image side in pixels (latents are 1/8); default 512 on a GPU, 64 (tiny) or 128 "
                             "(otherwise) on the CPU")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per loop and round (median reported); "
                        "raised after the first round where steps are short")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of interleaved rows (ratios per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with training.compile: true (the first step, compiling, is shown apart)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in backward, in every row (less memory, slower steps)")
    parser.add_argument("--fast", action="store_true", help="also time ours with the fast path: "
                        + ", ".join(f"training.{key}: {value}" for key, value in FAST_PATH.items()))
    parser.set_defaults(func=run)
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    resolution = args.resolution or (512 if args.device.startswith("cuda") else 64 if args.model == "tiny" else 128)
    for name, value, low in (("--steps", args.steps, 1), ("--warmup", args.warmup, 1),
                             ("--batch-size", args.batch_size, 1), ("--rank", args.rank, 1),
                             ("--rounds", args.rounds, 1),
                             ("--resolution", resolution, 64), ("--threads", args.threads, 0)):
        if value < low:
            raise ValueError(f"{name} {value} must be >= {low}")
    if args.model not in ("tiny", *BENCH_ARCHITECTURES) and not Path(args.model).exists():
        raise ValueError(f"--model {args.model!r}: use tiny, {', '.join(BENCH_ARCHITECTURES)} or the path of an "
                         "SD1/SD2/SDXL checkpoint")
    if resolution % 64:
        raise ValueError(f"--resolution {resolution}: use a multiple of 64 (e.g. 128 or 512)")
    return BenchSettings(model=args.model, device=args.device, resolution=resolution, steps=args.steps,
                         warmup=args.warmup, batch_size=args.batch_size, rank=args.rank, threads=args.threads,
                         gradient_checkpointing=args.gradient_checkpointing)


def _run_model_rows(settings: BenchSettings, names: List[str], rounds: int) -> Dict[str, RowRounds]:
    """Runs the rows; tiny and sd15 are first written as the single file the cli row (and tiny's others) load."""
    if settings.model not in ("tiny", "sd15"):
        return run_rounds(settings, names, rounds, run_in_process)
    with tempfile.TemporaryDirectory(prefix=f"bench-{settings.model}-") as folder:
        if settings.model == "tiny":
            settings.model = settings.checkpoint = str(build_tiny_checkpoint(Path(folder)))
        else:
            settings.checkpoint = str(write_sd15_file(Path(folder) / "sd15-random.safetensors"))
        return run_rounds(settings, names, rounds, run_in_process)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; 0 when done, 1 when a row's process died, 2 for bad arguments."""
    import torch

    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"error: {error}")
        return 2
    threads = settings.threads or torch.get_num_threads()
    print(f"bench train: {settings.model} on {settings.device}, {settings.resolution}x{settings.resolution} px "
          f"({settings.resolution // 8}x{settings.resolution // 8} latents), batch {settings.batch_size}, rank "
          f"{settings.rank}, UNet only{CHECKPOINTING[settings.gradient_checkpointing]}, median of {settings.steps} "
          f"or more steps after {settings.warmup} in each of {args.rounds} interleaved rounds, "
          f"{threads} threads, load average {_load()}")
    names = (["floor", "ours", "reference"] + ["fast"] * args.fast + ["compiled"] * args.compile
             + ["cli"] * (settings.model != "sdxl"))  # the sdxl architecture has no single file to load
    try:
        results = _run_model_rows(settings, names, args.rounds)
    except BenchRowError as error:
        print(f"error: {error}")
        return 1
    print(f"UNet parameters: {results['floor'].first.parameters / 1e6:.1f}M")
    print(format_table(results, "peak VRAM" if settings.device.startswith("cuda") else "peak RSS"))
    print(format_ratios(results))
    print(f"load average after: {_load()}")
    return 0
