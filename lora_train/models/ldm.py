"""SD1/SD2 held as an ldm `LatentDiffusion`, as the WebUI holds its loaded checkpoint (eps and v-prediction).

The model is used in place: no copy, no conversion. `training()` freezes every base parameter and turns off
ldm's own gradient checkpointing (its reentrant `CheckpointFunction` only differentiates a block's own
parameters, so adapters inside it would get no gradient), optionally wraps the UNet's blocks in PyTorch's
non-reentrant checkpoint instead, and on exit restores every flag and attribute it touched.
SD1's text encoder is a transformers CLIPTextModel, SD2's an OpenCLIP text tower with fused attention
(ldm's FrozenOpenCLIPEmbedder); both are adapted under kohya's `lora_te_text_model_encoder_layers_*` stems.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from . import HeldModel, ModelLoadError, SizeInfo, TargetSpec
from .common import CHECKPOINT_FLAGS, HeldModelAdapter, checkpoint_blocks, checkpointed, frozen, switched_off
from .conditioning import Cond
from ..targets import (TEXT_ENCODER_BLOCKS, TEXT_ENCODER_PREFIX, UNET_PREFIX, Target, compvis_to_diffusers_path,
                       find_open_clip_targets, find_targets, unet_blocks)

logger = logging.getLogger(__name__)


def _clip_text_model(cond_stage_model: nn.Module) -> nn.Module:
    """The HF CLIPTextModel inside ldm's FrozenCLIPEmbedder, or inside the WebUI's wrapper of it."""
    for holder in (cond_stage_model, getattr(cond_stage_model, "wrapped", None)):
        transformer = getattr(holder, "transformer", None)
        if transformer is not None and hasattr(transformer, "text_model"):
            return transformer
    return None


def _open_clip_embedder(cond_stage_model: nn.Module) -> Optional[nn.Module]:
    """ldm's FrozenOpenCLIPEmbedder (its `.model` an open_clip CLIP), or the one inside the WebUI's wrapper."""
    for holder in (cond_stage_model, getattr(cond_stage_model, "wrapped", None)):
        model = getattr(holder, "model", None)
        if hasattr(holder, "layer_idx") and hasattr(getattr(model, "transformer", None), "resblocks"):
            return holder
    return None


def _text_encoder_targets(cond_stage_model: nn.Module, text_model: Optional[nn.Module]) -> Dict[str, Target]:
    if text_model is not None:
        return find_targets(text_model, TEXT_ENCODER_BLOCKS, TEXT_ENCODER_PREFIX)
    embedder = _open_clip_embedder(cond_stage_model)
    if embedder is None:
        logger.warning("the text encoder (%s) is neither CLIP nor OpenCLIP as ldm holds them; training the UNet "
                       "only (set model.train_text_encoder: false to silence this)", type(cond_stage_model).__name__)
        return {}
    resblocks = embedder.model.transformer.resblocks  # the conditioning stops layer_idx blocks before the end
    return find_open_clip_targets(embedder.model, TEXT_ENCODER_PREFIX, layers=len(resblocks) - embedder.layer_idx)


class LdmModel(HeldModelAdapter):
    """DiffusionModel over an ldm LatentDiffusion (SD1 or SD2)."""

    size_conditioned = False  # the conditioning depends on the caption only

    def __init__(self, sd_model: nn.Module, name: str = "", device: Optional[torch.device] = None,
                 clip_skip: int = 1):
        """device: where the UNet runs. The WebUI's --medvram keeps modules on the CPU between their
        forwards and moves them in on call, so their current place is not where the work happens.
        clip_skip: the host's setting, which its text encoder wrapper applies (recorded in the metadata)."""
        self.sd_model = sd_model
        self.name = name
        self.clip_skip = clip_skip
        self._device = torch.device(device) if device is not None else None
        self.text_model = _clip_text_model(sd_model.cond_stage_model)
        self.family = "sd1" if self.text_model is not None else "sd2"
        self.prediction = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        self.alphas_cumprod = sd_model.alphas_cumprod.detach().float()
        self.unet = sd_model.model.diffusion_model

    @classmethod
    def adapt(cls, sd_model: nn.Module, held: HeldModel) -> Optional["LdmModel"]:
        """The adapter for an ldm LatentDiffusion; None for any other model."""
        if not (hasattr(sd_model, "cond_stage_model") and hasattr(sd_model, "get_learned_conditioning")):
            return None
        unet = sd_model.model.diffusion_model
        if unet.in_channels != 4:
            raise ModelLoadError(f"the loaded checkpoint is an inpainting or depth model (its UNet takes "
                                 f"{unet.in_channels} input channels); load the base (non-inpainting) model")
        return cls(sd_model, name=held.name, device=held.device, clip_skip=held.clip_skip)

    def lora_targets(self, spec: TargetSpec) -> Dict[str, Target]:
        targets = find_targets(self.unet, unet_blocks(spec.conv), UNET_PREFIX, rename=compvis_to_diffusers_path)
        if spec.text_encoder:
            targets.update(_text_encoder_targets(self.sd_model.cond_stage_model, self.text_model))
        return targets

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.sd_model.first_stage_model
        vae_dtype = next(vae.parameters()).dtype
        posterior = self.sd_model.encode_first_stage(pixels.to(self.device, vae_dtype))
        return self.sd_model.get_first_stage_encoding(posterior).float()

    def encode_prompts(self, captions: List[str], sizes: List[SizeInfo]) -> Cond:
        return Cond(self.sd_model.get_learned_conditioning(list(captions)))

    def encoders(self) -> Dict[str, nn.Module]:
        return {"vae": self.sd_model.first_stage_model, "text_encoder": self.sd_model.cond_stage_model}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.sd_model.apply_model(noisy.to(self.dtype), timesteps, cond.crossattn.to(self.dtype))

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool, text_encoder: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen(self.sd_model))
            stack.enter_context(switched_off(self.unet, CHECKPOINT_FLAGS))
            if gradient_checkpointing:
                stack.enter_context(checkpointed(checkpoint_blocks(self.unet)))
            yield
