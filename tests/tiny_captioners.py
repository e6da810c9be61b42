"""Tiny, randomly initialised BLIP and GIT captioners saved to a folder, and small test images.

The BLIP builder is the library's (`lora_train.bench_caption.build_tiny_blip`, which the benchmark uses too);
the GIT one lives here because only the tests need it. Both are loaded back through `create_captioner(folder)`,
the path a user's local model folder takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

from lora_train.bench_caption import (TINY_IMAGE_SIZE, build_tiny_blip, make_bench_images, tiny_text_config,
                                      tiny_vision_config, write_tiny_tokenizer)

__all__ = ["build_tiny_blip", "build_tiny_git", "write_images"]


def build_tiny_git(folder: Path, seed: int = 0) -> Path:
    """Saves a randomly initialised tiny GIT captioner (weights, processor, tokenizer) to folder; returns it."""
    folder = Path(folder)
    tokenizer = write_tiny_tokenizer(folder)
    config = GitConfig(vision_config=tiny_vision_config(), bos_token_id=tokenizer.cls_token_id,
                       initializer_range=0.3, **tiny_text_config(tokenizer))
    torch.manual_seed(seed)
    GitForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                         crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    GitProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder


def write_images(folder: Path, names: List[str], size: int = 48) -> List[Path]:
    """Saves one distinct small RGB image per name (the extension picks the format) in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in zip(names, make_bench_images(len(names), size=size, seed=len(names))):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    return paths
