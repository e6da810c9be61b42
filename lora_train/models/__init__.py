"""The SD interface: everything model-specific hides behind `DiffusionModel`, so the trainer is one loop.

A new family is one file here with one adapter class, listed in `adapters.ADAPTERS` (models a WebUI holds) or
loaded by `diffusers.py` (standalone files), and one entry in `families.FAMILIES` (what its LoRA files say).
Each adapter owns its key scheme: the stems of its targets, the renames, the blocks to checkpoint.
`ldm.py` adapts SD1/SD2 as the WebUI holds them, `sgm.py` SDXL as the WebUI holds it, `diffusers.py` loads a
checkpoint file or a diffusers folder for standalone training (SDXL ones in `diffusers_xl.py`; `detect.py` tells
what a file is). `forge.py` adapts SD1/SD2 as Forge's engine holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager, Dict, List, Optional, Protocol, Tuple

import torch
from torch import nn

from .conditioning import Cond


class ModelLoadError(ValueError):
    """A base model that cannot be used; the message says what to do."""


@dataclass
class TargetSpec:
    """Which parts of the model get adapters."""

    text_encoder: bool = True
    conv: bool = False


@dataclass
class HeldModel:
    """What a host knows about the model it holds, beside the module itself."""

    name: str = ""  # shown in metadata (ss_sd_model_name)
    device: Optional[torch.device] = None  # where it computes (None: where its UNet's weights are)
    clip_skip: int = 1  # the host's CLIP-skip setting: 1 = last layer, 2 = penultimate, ...


class DiffusionModel(Protocol):
    family: str  # a key of families.FAMILIES: "sd1" | "sd2" | "sdxl"
    prediction: str  # "epsilon" | "v_prediction"
    alphas_cumprod: torch.Tensor  # the model's own noise schedule, fp32 [num_train_timesteps]
    device: torch.device
    name: str  # shown in metadata (ss_sd_model_name)
    clip_skip: int  # the text-encoder layer conditioning is taken from, counted from the last (ss_clip_skip)
    size_conditioned: bool  # whether the conditioning depends on the samples' sizes (SDXL), not only the caption
    relayout: bool  # whether a run may put the UNet's conv weights in channels-last order (no: they share a host's)
    unet: nn.Module  # the denoiser the adapters are trained on

    def lora_targets(self, spec: TargetSpec) -> Dict[str, nn.Module]:
        """kohya key stem -> Linear/Conv2d, or a FusedProjection of a fused attention, to adapt."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> scaled latents [B,C,H/8,W/8]."""

    def encode_prompts(self, captions: List[str], sizes: List["SizeInfo"]) -> Cond:
        """Conditioning for the UNet, one per caption; `sizes` are the samples' original size, crop, target."""

    def encoders(self) -> Dict[str, nn.Module]:
        """{"vae": ..., "text_encoder": ...}: offloaded while training needs only their cached outputs."""

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """UNet output for noisy latents at integer timesteps."""

    def training(self, gradient_checkpointing: bool, text_encoder: bool) -> ContextManager:
        """Freezes the base, sets up checkpointing; on exit restores exactly what was there."""

    def load_unet(self) -> None:
        """Reads UNet weights left in the file (the CLI reads them once the caches are filled); else nothing."""

    def release_encoders(self, offloader) -> None:
        """At the end of the loop, the encoders the run offloaded: back at once (a host's model) or when next
        used (the CLI's, which may never use them again)."""


@dataclass(frozen=True, order=True)
class SizeInfo:
    """Where a training sample came from, as SDXL's size conditioning encodes it (pixels, height first)."""

    original: Tuple[int, int]  # (height, width) of the source image
    crop_top_left: Tuple[int, int]  # (top, left) of the crop, in the resized image
    target: Tuple[int, int]  # (height, width) trained on: the bucket

    @staticmethod
    def square(side: int) -> "SizeInfo":
        return SizeInfo((side, side), (0, 0), (side, side))
