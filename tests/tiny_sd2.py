"""A tiny SD2-layout ldm model built in code: OpenCLIP text tower (fused attention), linear proj, v-prediction.

Its OpenCLIP architecture is registered with open_clip from a config written beside the checkpoint, so ldm's
FrozenOpenCLIPEmbedder builds it by name without downloading anything.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Tuple

import torch
import yaml
from safetensors.torch import save_file

from lora_train.tiny import LDM_CONFIG, build_tiny_ldm

OPEN_CLIP_ARCH = "ViT-tiny-lora-train-test"
TEXT_WIDTH, TEXT_HEADS, TEXT_BLOCKS = 64, 2, 3
TEXT_LAYERS_USED = TEXT_BLOCKS - 1  # SD2 conditions on the penultimate layer


def build_tiny_sd2_checkpoint(folder: Path) -> Tuple[Path, torch.nn.Module]:
    """(tiny-sd2-v.safetensors with its .yaml beside it, the ldm model whose weights it holds)."""
    import open_clip

    arch = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": TEXT_HEADS,
                         "layers": TEXT_BLOCKS}}
    (folder / f"{OPEN_CLIP_ARCH}.json").write_text(json.dumps(arch))
    open_clip.add_model_config(folder / f"{OPEN_CLIP_ARCH}.json")
    config = copy.deepcopy(LDM_CONFIG)
    params = config["model"]["params"]
    params["parameterization"] = "v"
    unet = params["unet_config"]["params"]
    unet.pop("num_heads")
    unet.update(num_head_channels=16, use_linear_in_transformer=True, context_dim=TEXT_WIDTH)
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {
        "arch": OPEN_CLIP_ARCH, "version": None, "device": "cpu", "freeze": True, "layer": "penultimate"}}
    model = build_tiny_ldm(config, seed=3)
    path = folder / "tiny-sd2-v.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    return path, model
