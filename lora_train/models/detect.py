"""What a single-file checkpoint is, told from its state-dict keys and the input conv's shape.

SD1 has openai CLIP under `cond_stage_model.transformer`, SD2 OpenCLIP under `cond_stage_model.model`, SDXL base
both under `conditioner.embedders.0` (CLIP ViT-L) and `.1` (OpenCLIP bigG). What cannot be trained is refused
with what it is: an SDXL refiner (OpenCLIP alone, at `conditioner.embedders.0.model`), SD3 (`joint_blocks`),
Flux (`double_blocks`), an inpainting UNet (9 input channels: latents, mask, masked image), anything else.
"""

from __future__ import annotations

from typing import Dict

import torch

from . import ModelLoadError
from .families import SUPPORTED

UNET_INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"
INPAINTING_CHANNELS = 9
_TEXT_ENCODER_MARKERS = (("conditioner.embedders.1.model.", "sdxl"), ("conditioner.embedders.0.model.", "refiner"),
                         ("cond_stage_model.transformer.", "sd1"), ("cond_stage_model.model.", "sd2"))
_UNSUPPORTED_MARKERS = (("joint_blocks.", "an SD3 checkpoint"), ("double_blocks.", "a Flux checkpoint"))
_TITLES = {"sd1": "an SD 1.x", "sd2": "an SD 2.x", "sdxl": "an SDXL"}


def detect_family(checkpoint: Dict[str, torch.Tensor], name: str) -> str:
    """"sd1" | "sd2" | "sdxl" for a trainable base model's state dict.

    Raises:
        ModelLoadError: an SDXL refiner, SD3, Flux, an inpainting model or not a base model; the message names it
        and what is supported.
    """
    for marker, what in _UNSUPPORTED_MARKERS:
        if any(marker in key for key in checkpoint):
            raise _unsupported(name, what)
    family = next((family for marker, family in _TEXT_ENCODER_MARKERS
                   if any(key.startswith(marker) for key in checkpoint)), None)
    if family == "refiner":
        raise _unsupported(name, "an SDXL refiner (it has only the OpenCLIP text encoder and refines the base "
                                 "model's output)", "Use the SDXL base model it belongs to, or another")
    if family is None:
        raise _unsupported(name, "not a Stable Diffusion base model (no text-encoder weights; a LoRA, VAE or "
                                 "embedding file cannot be one)")
    conv = checkpoint.get(UNET_INPUT_CONV)
    if conv is not None and conv.dim() == 4 and conv.shape[1] == INPAINTING_CHANNELS:
        raise _unsupported(name, f"{_TITLES[family]} inpainting model (its UNet takes {INPAINTING_CHANNELS} input "
                                 "channels)", "Use the regular (non-inpainting) version of the model")
    return family


def _unsupported(name: str, what: str, fix: str = "Point model.base_model at one of those") -> ModelLoadError:
    return ModelLoadError(f"{name} is {what}; this trains {SUPPORTED} base models. {fix}")
