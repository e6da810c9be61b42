"""`python -m lora_train bench gpu`: the one-command GPU check (about 5-8 minutes on one GPU), a table and one JSON.

It runs SD1.5's architecture (random weights) at 512 px, batch 1, rank 16 in fp16 and bf16, with and without
gradient checkpointing, and SDXL's at 1024 px with checkpointing (UNet only): s/step of floor / ours / reference,
peak `torch.cuda.max_memory_allocated` and the memory preflight's estimate (estimate / measured); then the checks
of `lora_train.bench_gpu_parts` (fp16 vs fp32 loss, exact resume, a forced out-of-memory ending in the advice).
Every part is guarded: one that fails prints its error in its row and the rest runs; the JSON is rewritten after
each part, so a timeout still leaves what was measured. `--tiny` runs the same on the CPU with the tiny SD1 and
SDXL models at 64 px (CI), memory "n/a (cpu)" and the out-of-memory check skipped.

Needs torch with CUDA, transformers, peft, safetensors, Pillow and diffusers (which a GPU machine may lack):
`make gpu-wheels` downloads the wheels into gpu-wheels/ (pure Python, and Pillow for CPython 3.12; ignored by
git: carry it with the tree, 13 MB); then
on the GPU machine, in the project root:

    pip install --no-deps --no-index gpu-wheels/*.whl && python -m lora_train bench gpu --out bench-gpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import torch

from .bench_gpu_parts import GIB, check_requirements, check_rows, speed_rows
from .bench_loops import BenchSettings, run_row

SD15_RUNS = [("fp16", False), ("fp16", True), ("bf16", False), ("bf16", True)]
COLUMNS = f"{'part':<28} {'item':<14} {'status':<8} {'s/step':>8} {'peak GiB':>12} {'est. GiB':>9} {'est/peak':>8}"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers `gpu` on a subparsers object (the caller puts it under `bench`)."""
    parser = subparsers.add_parser("gpu", help="the GPU check: speed, memory and its estimate, fp16, resume, OOM",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny models on the CPU at 64 px (CI smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (ignored with --tiny)")
    parser.add_argument("--out", default="bench-gpu.json", help="the JSON file written")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per loop (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.set_defaults(func=run)
    return parser


def format_row(row: Dict) -> str:
    def number(key: str, scale: float, width: int, digits: int) -> str:
        return f"{row[key] / scale:>{width}.{digits}f}" if key in row else f"{'':>{width}}"
    peak = number("peak_bytes", GIB, 12, 2) if "peak_bytes" in row or "s_per_step" not in row else f"{'n/a (cpu)':>12}"
    line = (f"{row['part']:<28} {row['item']:<14} {row['status']:<8} {number('s_per_step', 1, 8, 3)} {peak} "
            f"{number('estimate_bytes', GIB, 9, 2)} {number('estimate_ratio', 1, 8, 2)}")
    return line.rstrip() + (f"  {row['detail']}" if row.get("detail") else "")


def _plan(args: argparse.Namespace, folder: Path):
    """[(part label, settings)] of the speed parts, and the settings the checks run with."""
    from .tiny import build_tiny_checkpoint
    from .tiny_sdxl import build_tiny_sdxl_checkpoint

    device = "cpu" if args.tiny else args.device
    base = BenchSettings(device=device, steps=args.steps, warmup=args.warmup, rank=16)
    sd15, sdxl, small, large = "sd15", "sdxl", 512, 1024
    if args.tiny:
        sd15, sdxl = str(build_tiny_checkpoint(folder)), str(build_tiny_sdxl_checkpoint(folder))
        small = large = 64
    parts = [(f"sd15 {small}px {precision}{' ckpt' * checkpointing}",
              replace(base, model=sd15, resolution=small, precision=precision, gradient_checkpointing=checkpointing))
             for precision, checkpointing in SD15_RUNS]
    parts.append((f"sdxl {large}px fp16 ckpt unet", replace(base, model=sdxl, resolution=large,
                                                             gradient_checkpointing=True)))
    return parts, replace(base, model=sd15, resolution=small)


def _write(path: Path, header: Dict, rows: List[Dict]) -> None:
    path.write_text(json.dumps({**header, "rows": rows}, indent=2), encoding="utf-8")


def _header(args: argparse.Namespace) -> Dict:
    device = "cpu" if args.tiny else args.device
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    return {"mode": "tiny" if args.tiny else "full", "device": device, "device_name": name,
            "torch": torch.__version__, "requirements": check_requirements(), "batch_size": 1, "rank": 16,
            "steps": args.steps, "warmup": args.warmup}


def run(args: argparse.Namespace) -> int:
    """Runs every part; 0 when all passed, 1 when one failed or was skipped for a missing package, 2 no GPU."""
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device: run on a GPU machine, or use --tiny for the CPU smoke test")
        return 2
    from .bench_train import run_in_process

    header, rows, out = _header(args), [], Path(args.out)
    print(f"bench gpu ({header['mode']}): {header['device_name']}, torch {header['torch']}, "
          + ", ".join(f"{name} {found}" for name, found in header["requirements"].items()))
    print(COLUMNS)
    run_one = run_row if args.tiny else run_in_process  # own processes on a GPU: each row's peak is its own
    with tempfile.TemporaryDirectory(prefix="bench-gpu-models-") as folder:
        parts, check_settings = _plan(args, Path(folder))
        for label, settings in parts:
            part_rows = speed_rows(label, settings, run_one, header["requirements"])
            _report(part_rows, rows, out, header)
        _report(check_rows(check_settings, header["requirements"]), rows, out, header)
    print(f"\n{COLUMNS}\n" + "\n".join(format_row(row) for row in rows))
    print(f"written: {out}")
    return 0 if all(row["status"] == "ok" or row["item"] == "out of memory" and args.tiny for row in rows) else 1


def _report(new_rows: List[Dict], rows: List[Dict], out: Path, header: Dict) -> None:
    """Prints a part's rows as they come and rewrites the JSON, so a timeout still leaves the results."""
    for row in new_rows:
        print(format_row(row), flush=True)
    rows.extend(new_rows)
    _write(out, header, rows)
