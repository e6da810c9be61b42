"""Tiny, randomly initialised SD1-topology checkpoints for the demo, the tests and the CI benchmarks.

`build_tiny_checkpoint(folder)` writes what a user's models folder holds: `tiny-sd1.safetensors` (the ldm
state-dict layout of a real SD1 checkpoint) with `tiny-sd1.yaml` beside it, whose text encoder points at a
local CLIP folder, so nothing is fetched from a hub. The block layout is SD1's (4 levels, 2 ResNets each,
attention at 3 of them); only the widths are tiny.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

import torch
import yaml
from safetensors.torch import save_file

from .models.clip_tokenizer import write_clip_tokenizer

CLIP_WIDTH = 32
UNET_CHANNELS = 32

LDM_CONFIG: Dict[str, Any] = {"model": {
    "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215, "use_ema": False, "parameterization": "eps",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": UNET_CHANNELS,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_heads": 4, "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": CLIP_WIDTH, "use_checkpoint": True, "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss",
            "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
                         "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [],
                         "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                              "params": {"version": "", "device": "cpu"}},
    }}}


def write_tiny_clip(folder: Path, seed: int) -> Path:
    """A local CLIP text-encoder folder (real CLIP vocabulary, tiny random transformer)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    write_clip_tokenizer(folder)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=CLIP_WIDTH, intermediate_size=CLIP_WIDTH * 2,
                            projection_dim=CLIP_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
                            eos_token_id=2, pad_token_id=1)
    torch.manual_seed(seed)
    CLIPTextModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_ldm_config(clip_dir: Path, v_prediction: bool = False) -> Dict[str, Any]:
    config = copy.deepcopy(LDM_CONFIG)
    params = config["model"]["params"]
    params["cond_stage_config"]["params"]["version"] = str(clip_dir)
    params["parameterization"] = "v" if v_prediction else "eps"
    return config


def build_tiny_ldm(config: Dict[str, Any], seed: int) -> torch.nn.Module:
    """An ldm LatentDiffusion from the config, with ldm's zero-initialised outputs re-randomised.

    ldm zero-initialises every proj_out and ResBlock output; left at zero, attention layers (and any LoRA on
    them) would have no effect on the output.
    """
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    return randomise_zero_weights(instantiate_from_config(OmegaConf.create(config).model).eval(), seed + 1)


def randomise_zero_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every all-zero weight matrix or kernel drawn from N(0, 0.02^2) instead, from a generator seeded with seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def build_tiny_checkpoint(folder: Path, name: str = "tiny-sd1", v_prediction: bool = False,
                          seed: int = 0) -> Path:
    """Writes <folder>/<name>.safetensors + <name>.yaml + <name>-clip/; returns the checkpoint path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip_dir = write_tiny_clip(folder / f"{name}-clip", seed)
    config = tiny_ldm_config(clip_dir.resolve(), v_prediction)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    model = build_tiny_ldm(config, seed)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
