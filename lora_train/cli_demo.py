"""`python -m lora_train demo`: the whole job on an embedded default, in seconds, on any machine.

Builds a tiny random SD1-topology checkpoint, a tiny random BLIP and a small synthetic dataset in code, captions
the images with the trigger word in front, writes a config from `configs/lora_default.yaml` sized for them,
trains, and prints where the LoRA and TensorBoard logs went. The models are random, so the captions are
random words and the result demonstrates the mechanics, not image quality.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from .config import DEFAULT_CONFIG_PATH

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
SIZES = ((96, 96), (128, 64), (64, 128))
TRIGGER = "demo style"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train a LoRA on a tiny built-in model and dataset",
                                   description="Build a tiny model and dataset, train, and show the results.")
    parser.add_argument("--out", default="demo", help="folder for the model, dataset, LoRA and logs")
    parser.set_defaults(func=run)


def make_sample_dataset(folder: Path, seed: int = 0, captions: bool = True) -> Path:
    """Shapes in colours on plain backgrounds, three aspect ratios; with captions, a .txt beside each image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        width, height = SIZES[index % len(SIZES)]
        image = Image.new("RGB", (width, height), tuple(rng.randrange(200, 256) for _ in range(3)))
        box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        image.save(folder / f"{index:02d}_{colour}_{shape}.png")
        if captions:
            (folder / f"{index:02d}_{colour}_{shape}.txt").write_text(
                f"{TRIGGER}, a {colour} {shape}, plain background", encoding="utf-8")
    return folder


def write_demo_config(out: Path, checkpoint: Path, dataset: Path) -> Path:
    """The default config with the tiny model, the sample data and CPU-sized settings."""
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    config["data"].update(train_data_dir=str(dataset.resolve()), resolution=64, min_bucket_reso=64,
                          max_bucket_reso=128, flip_aug=True)
    config["model"].update(base_model=str(checkpoint.resolve()), lora_rank=4, alpha=4)
    config["training"].update(batch_size=2, epochs=3, learning_rate=1e-3, lr_scheduler="cosine",
                              lr_warmup_steps=2)
    config["output"].update(output_dir=str((out / "output").resolve()), output_name="demo_lora",
                            save_steps=6, overwrite=True)
    path = out / "demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _caption(dataset: Path, model: Path) -> None:
    from .caption_writer import FolderOptions, caption_folder
    from .captioning import create_captioner

    report = caption_folder(dataset, create_captioner(str(model)), FolderOptions(prefix=f"{TRIGGER}, "))
    print(report.summary())
    example = sorted(dataset.glob("*.txt"))[0]
    print(f"e.g. {example.name}: {example.read_text(encoding='utf-8')!r}")


def run(args: argparse.Namespace) -> int:
    from . import cli_train
    from .bench_caption import build_tiny_blip
    from .tiny import build_tiny_checkpoint

    out = Path(args.out)
    print(f"building a tiny SD1-topology checkpoint, a tiny BLIP and a sample dataset in {out}/")
    checkpoint = build_tiny_checkpoint(out / "model")
    dataset = make_sample_dataset(out / "dataset", captions=False)
    _caption(dataset, build_tiny_blip(out / "model" / "tiny-blip"))
    config = write_demo_config(out, checkpoint, dataset)
    print(f"training with {config}")
    return cli_train.run(argparse.Namespace(config=str(config), dry_run=False, apply_advice=False))
