"""Captioning throughput benchmark (`python -m lora_train bench caption`) and the tiny BLIP it runs on offline.

The benchmark captions the same generated images once per batch size, after a warm-up batch, and prints
images/s per batch size with the ratio to batch size 1. `--model tiny` (the default) builds a randomly
initialised, few-layer BLIP with `build_tiny_blip` in a temp folder, so it works on a fresh machine with no
hub; its captions are random words, but its timings show what batching buys. `--model tiny-tagger` does the same
for the WD14 tagger path with `lora_train.tiny_tagger` (448x448 input, as the real taggers); a tagger's hub id
or folder benchmarks that tagger.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

import numpy as np
from PIL import Image

from lora_train.caption_writer import CaptionError, ImageCaptioner
from lora_train.captioning import CaptionOptions, create_captioner, require_torch_transformers
from lora_train.cli_caption import print_error
from lora_train.tagger import TaggerOptions, WdTagger
from lora_train.tiny_tagger import build_tiny_tagger

TINY_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TINY_WORDS = ("a an the of on in with and dog cat photo picture man woman tree house car red blue green small "
              "large sitting standing field street room table").split()
TINY_IMAGE_SIZE = 32
TINY_WIDTH = 32


def write_tiny_tokenizer(folder: Path, bos_token: str = "[CLS]") -> Any:
    """A BERT word-piece tokenizer over a few dozen words with its vocab.txt in folder.

    A bos_token that is not one of BERT's own (BLIP's "[DEC]") gets a vocab entry; the config values stay plain
    strings, as transformers 4.30 wants them.
    """
    _, transformers = require_torch_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    special = TINY_SPECIAL_TOKENS + (() if bos_token in TINY_SPECIAL_TOKENS else (bos_token,))
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(special + tuple(TINY_WORDS)) + "\n", encoding="utf-8")
    return transformers.BertTokenizer(str(vocab), bos_token=bos_token)


def tiny_text_config(tokenizer: Any) -> dict:
    """Text-decoder sizes and special token ids shared by the tiny BLIP and GIT."""
    return {"vocab_size": len(tokenizer), "hidden_size": TINY_WIDTH, "intermediate_size": 2 * TINY_WIDTH,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 128,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.sep_token_id}


def tiny_vision_config() -> dict:
    return {"hidden_size": TINY_WIDTH, "intermediate_size": 2 * TINY_WIDTH, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": TINY_IMAGE_SIZE, "patch_size": 8}


def build_tiny_blip(folder: Path, seed: int = 0, text_positions: int = 128) -> Path:
    """Saves a randomly initialised tiny BLIP captioner (weights, processor, tokenizer) to folder; returns it.

    The init is seeded and wider than BLIP's default (std 0.1) so that captions depend on the image;
    `text_positions` is the longest text its decoder takes.
    """
    torch, transformers = require_torch_transformers()
    folder = Path(folder)
    tokenizer = write_tiny_tokenizer(folder, bos_token="[DEC]")
    text = dict(tiny_text_config(tokenizer), bos_token_id=tokenizer.bos_token_id,
                sep_token_id=tokenizer.sep_token_id, initializer_range=0.1, max_position_embeddings=text_positions)
    vision = dict(tiny_vision_config(), projection_dim=TINY_WIDTH, initializer_range=0.1)
    config = transformers.BlipConfig(text_config=text, vision_config=vision, projection_dim=TINY_WIDTH,
                                     image_text_hidden_size=TINY_WIDTH)
    config.initializer_range = 0.1  # BlipConfig.__init__ ignores this keyword
    torch.manual_seed(seed)
    transformers.BlipForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    transformers.BlipProcessor(transformers.BlipImageProcessor(size=size), tokenizer).save_pretrained(folder)
    return folder


def make_bench_images(count: int, size: int = 128, seed: int = 0) -> List[Image.Image]:
    """count distinct RGB images: colour gradients with noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None]
    images = []
    for _ in range(count):
        base = rng.uniform(0, 255, 3) * ramp + rng.uniform(0, 255, 3) * ramp.transpose(1, 0, 2)
        pixels = np.clip(base / 2 + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


@dataclass
class BenchRow:
    batch_size: int
    seconds: float
    images_per_s: float
    ratio: float  # images/s relative to the reference batch size (1 when benchmarked)


def bench_batch_sizes(captioner: ImageCaptioner, images: Sequence[Image.Image],
                      batch_sizes: Sequence[int]) -> List[BenchRow]:
    """Times captioning all images at each batch size, each after one untimed warm-up batch."""
    captioner.load()
    timed = []
    for size in batch_sizes:
        captioner.caption(list(images[:size]), batch_size=size)
        started = time.perf_counter()
        captioner.caption(list(images), batch_size=size)
        timed.append((size, time.perf_counter() - started))
    reference = dict(timed).get(1, timed[0][1])
    return [BenchRow(size, seconds, len(images) / seconds, reference / seconds) for size, seconds in timed]


def format_table(rows: Sequence[BenchRow]) -> str:
    reference = 1 if any(row.batch_size == 1 for row in rows) else rows[0].batch_size
    lines = [f"{'batch':>5}  {'images/s':>9}  {'seconds':>8}  {'vs batch ' + str(reference):>11}"]
    lines += [f"{row.batch_size:>5}  {row.images_per_s:>9.2f}  {row.seconds:>8.2f}  {row.ratio:>10.2f}x"
              for row in rows]
    return "\n".join(lines)


def parse_batch_sizes(text: str) -> List[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CaptionError(f"--batch-sizes {text!r} is not a comma-separated list of numbers; use e.g. 1,8") from None
    if not sizes or min(sizes) < 1:
        raise CaptionError(f"--batch-sizes {text!r} needs numbers >= 1; use e.g. 1,8")
    return sizes


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers `caption` on a subparsers object (the caller puts it under `bench`)."""
    parser = subparsers.add_parser("caption", help="images/s of auto-captioning per batch size",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="BLIP/GIT or WD14 tagger hub id or folder; tiny: a tiny "
                        "random BLIP; tiny-tagger: a tiny WD14-format tagger")
    parser.add_argument("--images", type=int, default=32, help="images captioned per batch size")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.set_defaults(func=run)
    return parser


def _describe(captioner: ImageCaptioner) -> str:
    """The model's settings that change its speed."""
    if isinstance(captioner, WdTagger):
        threads = captioner.options.threads or "onnxruntime default"
        return f"{captioner.image_size}x{captioner.image_size} input, onnxruntime threads {threads}"
    torch, _ = require_torch_transformers()
    return f"{captioner.options.num_beams} beams, torch threads {torch.get_num_threads()}"


def _bench(args: argparse.Namespace, model: str) -> None:
    sizes = parse_batch_sizes(args.batch_sizes)
    if args.images < 1:
        raise CaptionError(f"--images {args.images} must be >= 1")
    captioner = create_captioner(model, CaptionOptions(device=args.device), TaggerOptions(device=args.device))
    captioner.load()
    load = " ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"{args.model} ({captioner.family}) on {captioner.device()}, {args.images} images, "
          f"{_describe(captioner)}, load average {load}")
    print(format_table(bench_batch_sizes(captioner, make_bench_images(args.images), sizes)))


TINY_MODELS = {"tiny": build_tiny_blip, "tiny-tagger": build_tiny_tagger}


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; 0 when done, 2 for bad arguments, 1 when the model cannot be loaded."""
    try:
        if args.model not in TINY_MODELS:
            _bench(args, args.model)
            return 0
        with tempfile.TemporaryDirectory(prefix=f"{args.model}-") as folder:
            _bench(args, str(TINY_MODELS[args.model](Path(folder))))
        return 0
    except CaptionError as error:
        print_error(error)
        return 2
    except (OSError, ImportError) as error:
        print_error(error)
        return 1
