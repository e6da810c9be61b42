"""SDXL held as generative-models' (sgm) `DiffusionEngine`, as the WebUI holds an SDXL checkpoint.

The model is used in place. Stems follow kohya's SDXL files, which the WebUI's built-in Lora loader places:
the UNet under its own compvis paths (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), the first
text encoder (CLIP ViT-L, `conditioner.embedders[0]`) as `lora_te1_text_model_...`, the second (OpenCLIP bigG,
`conditioner.embedders[1]`) as `lora_te2_text_model_...`. The WebUI's hijack wraps both embedders (the original
under `.wrapped`); a bare sgm model holds them directly.

Prompts go through the model's own conditioner, so training sees the WebUI's prompt parsing and CLIP skip, with
SDXL's size/crop conditioning built from each sample's `SizeInfo` rather than from the generation size. sgm runs
an embedder that is not `is_trainable` without gradient, so `training()` marks the adapted text encoders
trainable for the job; it also freezes the base, turns sgm's and open_clip's own (reentrant) checkpointing off,
optionally checkpoints the UNet's blocks with PyTorch's non-reentrant checkpoint, and restores all of it on exit.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import HeldModel, ModelLoadError, SizeInfo, TargetSpec
from .common import CHECKPOINT_FLAGS, HeldModelAdapter, checkpoint_blocks, checkpointed, frozen, switched_off
from .conditioning import Cond
from ..targets import (SDXL_TEXT_ENCODER_PREFIXES, TEXT_ENCODER_2_PREFIX, TEXT_ENCODER_BLOCKS, UNET_PREFIX, Target,
                       find_open_clip_targets, find_targets, unet_blocks)

# sgm's own checkpoint switches (ResBlock/UNet use_checkpoint, BasicTransformerBlock checkpoint) and open_clip's
# Transformer.grad_checkpointing: all reentrant, which gives adapters inside a block no gradient.
_SGM_CHECKPOINT_FLAGS = (*CHECKPOINT_FLAGS, "grad_checkpointing")
# The conditioner's batch keys of SDXL's size/crop embedders, with the SizeInfo field each one encodes.
_SIZE_KEYS = (("original_size_as_tuple", "original"), ("crop_coords_top_left", "crop_top_left"),
              ("target_size_as_tuple", "target"))


def _unwrapped(embedder: nn.Module) -> nn.Module:
    """The sgm embedder inside the WebUI's prompt-parsing wrapper, or the embedder itself when not wrapped."""
    return getattr(embedder, "wrapped", embedder)


def _text_encoders(conditioner: nn.Module) -> Optional[Tuple[nn.Module, nn.Module]]:
    """(CLIP ViT-L's transformers CLIPTextModel, OpenCLIP bigG's open_clip model), or None if not SDXL's pair."""
    embedders = list(conditioner.embedders)
    if len(embedders) < 2:
        return None
    transformer = getattr(_unwrapped(embedders[0]), "transformer", None)
    open_clip_model = getattr(_unwrapped(embedders[1]), "model", None)
    if not hasattr(transformer, "text_model") or not hasattr(getattr(open_clip_model, "transformer", None),
                                                              "resblocks"):
        return None
    return transformer, open_clip_model


def _refuse_untrainable(sd_model: nn.Module) -> None:
    """Raises ModelLoadError for an SDXL refiner or inpainting model, saying what to load instead."""
    input_keys = {getattr(embedder, "input_key", None) for embedder in sd_model.conditioner.embedders}
    if getattr(sd_model, "is_sdxl_refiner", False) or "aesthetic_score" in input_keys:
        raise ModelLoadError("the loaded checkpoint is an SDXL refiner, which LoRAs are not trained on; load an "
                             "SDXL base model (or one based on it, such as Pony or Illustrious)")
    in_channels = sd_model.model.diffusion_model.in_channels
    if in_channels != 4 or getattr(sd_model, "is_sdxl_inpaint", False):
        raise ModelLoadError(f"the loaded checkpoint is an SDXL inpainting model (its UNet takes {in_channels} input "
                             f"channels); load the SDXL base (non-inpainting) model it was made from")


class SgmModel(HeldModelAdapter):
    """DiffusionModel over an sgm DiffusionEngine (SDXL base and the checkpoints fine-tuned from it)."""

    family = "sdxl"
    size_conditioned = True  # the vector conditioning encodes each sample's size and crop

    def __init__(self, sd_model: nn.Module, name: str = "", device: Optional[torch.device] = None,
                 clip_skip: int = 1):
        """device: where the UNet runs (see HeldModelAdapter). clip_skip: the host's setting, which its text
        encoder wrappers apply (recorded in the metadata)."""
        self.sd_model = sd_model
        self.name = name
        self.clip_skip = clip_skip
        self._device = torch.device(device) if device is not None else None
        self.prediction = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        self.alphas_cumprod = sd_model.alphas_cumprod.detach().float()
        self.unet = sd_model.model.diffusion_model
        self.conditioner = sd_model.conditioner
        self.text_model, self.open_clip_model = _text_encoders(self.conditioner)

    @classmethod
    def adapt(cls, sd_model: nn.Module, held: HeldModel) -> Optional["SgmModel"]:
        """The adapter for an sgm DiffusionEngine; None for any other model.

        Raises:
            ModelLoadError: an SDXL refiner or inpainting model, or a conditioner without SDXL's two text encoders.
        """
        if not (hasattr(sd_model, "conditioner") and hasattr(getattr(sd_model, "model", None), "diffusion_model")):
            return None
        _refuse_untrainable(sd_model)
        if _text_encoders(sd_model.conditioner) is None:
            raise ModelLoadError("the loaded sgm checkpoint does not have SDXL's two text encoders (CLIP ViT-L and "
                                 "OpenCLIP bigG); load an SDXL base model")
        return cls(sd_model, name=held.name, device=held.device, clip_skip=held.clip_skip)

    def lora_targets(self, spec: TargetSpec) -> Dict[str, Target]:
        """Every layer of both text encoders, as kohya's SDXL files have them: TE1's conditioning is a hidden state
        before its last layer, but OpenCLIP's pooled output, part of the vector, runs through all of TE2's."""
        targets = find_targets(self.unet, unet_blocks(spec.conv), UNET_PREFIX)
        if spec.text_encoder:
            targets.update(find_targets(self.text_model, TEXT_ENCODER_BLOCKS, SDXL_TEXT_ENCODER_PREFIXES[0]))
            targets.update(find_open_clip_targets(self.open_clip_model, TEXT_ENCODER_2_PREFIX))
        return targets

    def _text_embedders(self) -> List[nn.Module]:
        """The conditioner's embedders of the two text encoders (the WebUI's wrappers, when it wrapped them)."""
        return list(self.conditioner.embedders)[:2]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.sd_model.first_stage_model.parameters()).dtype
        return self.sd_model.encode_first_stage(pixels.to(self.device, vae_dtype)).float()

    def encode_prompts(self, captions: List[str], sizes: List[SizeInfo]) -> Cond:
        """The conditioner's {crossattn, vector} for the captions; the vector's size/crop part is each sample's.

        The WebUI's own get_learned_conditioning gives every prompt the generation's size and no crop; a sample
        of the training set says where its pixels came from instead, as SDXL was trained.
        """
        batch = {"txt": list(captions)}
        for key, field in _SIZE_KEYS:
            batch[key] = torch.tensor([getattr(size, field) for size in sizes], dtype=torch.float32,
                                      device=self.device)
        cond = self.conditioner(batch)
        return Cond(cond["crossattn"], cond["vector"])

    def encoders(self) -> Dict[str, nn.Module]:
        return {"vae": self.sd_model.first_stage_model, "text_encoder": self.conditioner}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The UNet through sgm's wrapper, as the WebUI's apply_model calls it for a non-inpainting model."""
        return self.sd_model.model(noisy.to(self.dtype), timesteps, cond.to(dtype=self.dtype).as_sgm())

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool, text_encoder: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen(self.sd_model))
            stack.enter_context(switched_off(self.sd_model, _SGM_CHECKPOINT_FLAGS))
            if text_encoder:
                stack.enter_context(_trainable(self._text_embedders()))
            if gradient_checkpointing:
                stack.enter_context(checkpointed(checkpoint_blocks(self.unet)))
            yield


@contextlib.contextmanager
def _trainable(embedders: List[nn.Module]) -> Iterator[None]:
    """`is_trainable` set on the embedders for the duration, so sgm's conditioner runs them with gradient."""
    saved = [(embedder, embedder.is_trainable) for embedder in embedders]
    try:
        for embedder, _ in saved:
            embedder.is_trainable = True
        yield
    finally:
        for embedder, flag in saved:
            embedder.is_trainable = flag
