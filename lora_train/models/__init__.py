"""The SD interface: everything model-specific hides behind `DiffusionModel`, so the trainer is one loop.

`ldm.py` adapts an ldm LatentDiffusion as the WebUI holds it; `diffusers.py` loads a checkpoint file or a
diffusers folder for standalone training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager, Dict, List, Protocol, Tuple

import torch
from torch import nn

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTIONS = ("epsilon", "v_prediction")


class ModelLoadError(ValueError):
    """A base model that cannot be used; the message says what to do."""


@dataclass
class TargetSpec:
    """Which parts of the model get adapters."""

    text_encoder: bool = True
    conv: bool = False


class DiffusionModel(Protocol):
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction: str  # "epsilon" | "v_prediction"
    alphas_cumprod: torch.Tensor  # the model's own noise schedule, fp32 [num_train_timesteps]
    device: torch.device
    name: str  # shown in metadata (ss_sd_model_name)
    unet: nn.Module  # the denoiser the adapters are trained on

    def lora_targets(self, spec: TargetSpec) -> Dict[str, nn.Module]:
        """kohya key stem -> Linear/Conv2d to adapt."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> scaled latents [B,C,H/8,W/8]."""

    def encode_prompts(self, captions: List[str], sizes: List[Tuple[int, int]]) -> Any:
        """Conditioning for the UNet: a tensor (SD1/2) or dict crossattn+vector (SDXL)."""

    def encoders(self) -> Dict[str, nn.Module]:
        """{"vae": ..., "text_encoder": ...}: offloaded while training needs only their cached outputs."""

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        """UNet output for noisy latents at integer timesteps."""

    def training(self, gradient_checkpointing: bool, text_encoder: bool) -> ContextManager:
        """Freezes the base, sets up checkpointing; on exit restores exactly what was there."""


def base_model_version(family: str, prediction: str) -> str:
    """kohya's ss_base_model_version for a family: sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0."""
    if family == "sd1":
        return "sd_v1"
    if family == "sd2":
        return "sd_v2_v" if prediction == "v_prediction" else "sd_v2"
    return "sdxl_base_v1-0"
