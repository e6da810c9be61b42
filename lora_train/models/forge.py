"""SD1/SD2 as Stable Diffusion WebUI Forge holds its loaded checkpoint: a Forge engine, trained in place.

Works on the objects the engine carries, without importing Forge: `forge_objects.unet.model` (a KModel: the
compvis-named `diffusion_model`, its `predictor` with the noise schedule, `storage_dtype`/`computation_dtype`),
the engine's `text_processing_engine` (Forge's own prompt parsing, 75-token chunks, emphasis and CLIP skip, over
the HF CLIPTextModel it holds) and `encode_first_stage` for the VAE.

Forge loads every weight under `torch.inference_mode()`, and autograd refuses to save inference tensors. For a
job, `training()` hands each module a normal tensor that shares the weight's memory (DLPack: no copy, nothing
written) in place of every inference tensor, frozen; on exit the original Parameter objects go back, untouched.
Forge's transformer block adds in place to a tensor its LayerNorm saved for backward, so each LayerNorm gets a
clone of its input while gradients are recorded. Forge's own gradient checkpointing raises NotImplementedError:
its switches are turned off and PyTorch's non-reentrant checkpoint wraps the blocks instead.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from . import HeldModel, ModelLoadError, SizeInfo, TargetSpec
from .common import CHECKPOINT_FLAGS, HeldModelAdapter, checkpoint_blocks, checkpointed, switched_off
from .conditioning import Cond
from ..targets import (TEXT_ENCODER_BLOCKS, TEXT_ENCODER_PREFIX, UNET_PREFIX, compvis_to_diffusers_path,
                       find_targets, unet_blocks)

TRAINABLE_STORAGE = (torch.float32, torch.float16, torch.bfloat16)
FAMILY_FLAGS = (("is_sd1", "sd1"), ("is_sd2", "sd2"))


class ForgeModel(HeldModelAdapter):
    """DiffusionModel over a Forge engine holding SD1 or SD2."""

    size_conditioned = False  # the conditioning depends on the caption only
    relayout = False  # the job's weights share Forge's memory: channels-last would copy every convolution

    def __init__(self, engine, family: str, name: str = "", device: Optional[torch.device] = None,
                 clip_skip: int = 1):
        self.engine = engine
        self.family = family
        self.name = name
        self.clip_skip = clip_skip
        self.k_model = engine.forge_objects.unet.model
        self.unet = self.k_model.diffusion_model
        predictor = self.k_model.predictor
        self.prediction = "v_prediction" if predictor.prediction_type == "v_prediction" else "epsilon"
        self.alphas_cumprod = predictor.alphas_cumprod.detach().clone().float()
        self.text_model = engine.text_processing_engine.text_encoder.transformer  # the HF CLIPTextModel
        self._device = torch.device(device) if device is not None else None

    @classmethod
    def adapt(cls, engine, held: HeldModel) -> Optional["ForgeModel"]:
        """The adapter for a Forge engine; None for any other model."""
        objects = getattr(engine, "forge_objects", None)
        if objects is None or not hasattr(getattr(objects.unet, "model", None), "predictor"):
            return None
        family = next((name for flag, name in FAMILY_FLAGS if getattr(engine, flag, False)), None)
        if getattr(engine, "is_sdxl", False):
            raise ModelLoadError("SDXL held by Forge cannot be trained here yet; load an SD1.5 or SD2 checkpoint, "
                                 "or train the SDXL file standalone (python -m lora_train train)")
        if family is None:
            return None  # Flux, SD3, Chroma...: adapt() names them
        if getattr(engine, "is_inpaint", False):
            raise ModelLoadError("the loaded checkpoint is an inpainting model; load the base (non-inpainting) model")
        _check_storage(objects.unet.model)
        return cls(engine, family, name=held.name, device=held.device, clip_skip=held.clip_skip)

    @property
    def dtype(self) -> torch.dtype:
        return self.k_model.computation_dtype

    def lora_targets(self, spec: TargetSpec) -> Dict[str, nn.Module]:
        targets = find_targets(self.unet, unet_blocks(spec.conv), UNET_PREFIX, rename=compvis_to_diffusers_path)
        if spec.text_encoder:
            targets.update(find_targets(self.text_model, TEXT_ENCODER_BLOCKS, TEXT_ENCODER_PREFIX))
        return targets

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Forge's VAE encode (it scales the latents); the result cloned out of inference mode."""
        with torch.no_grad():
            return self.engine.encode_first_stage(pixels.to(self.device, torch.float32)).float().clone()

    def encode_prompts(self, captions: List[str], sizes: List[SizeInfo]) -> Cond:
        """Forge's text path with this job's CLIP skip, outside inference mode so the TE adapters train."""
        text = self.engine.text_processing_engine
        saved = text.clip_skip
        text.clip_skip = self.clip_skip
        try:
            crossattn = text(list(captions))
        finally:
            text.clip_skip = saved
        return Cond(crossattn.clone() if crossattn.is_inference() else crossattn)

    def encoders(self) -> Dict[str, nn.Module]:
        return {"vae": self.engine.forge_objects.vae.first_stage_model, "text_encoder": self.text_model}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The UNet as Forge's KModel calls it, in its computation dtype, on integer timesteps."""
        dtype = self.k_model.computation_dtype
        return self.unet(noisy.to(dtype), timesteps.float(), context=cond.crossattn.to(dtype),
                         transformer_options={})

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool, text_encoder: bool) -> Iterator[None]:
        modules = [self.unet, self.text_model, self.engine.forge_objects.vae.first_stage_model]
        with contextlib.ExitStack() as stack:
            stack.enter_context(normal_weights(modules))
            stack.enter_context(layer_norm_inputs_cloned(self.unet))
            stack.enter_context(switched_off(self.unet, CHECKPOINT_FLAGS))
            if gradient_checkpointing:
                stack.enter_context(checkpointed(checkpoint_blocks(self.unet)))
            yield


def _check_storage(k_model) -> None:
    storage = getattr(k_model, "storage_dtype", torch.float32)
    if storage not in TRAINABLE_STORAGE:
        raise ModelLoadError(f"Forge holds the UNet in low bits ({storage}); adapters need it in 16 or 32 bits. "
                             f"Set 'Diffusion in Low Bits' at the top of the page to 'Automatic' and start again")


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor over the same memory: DLPack makes a new tensor, it copies nothing."""
    return torch.from_dlpack(tensor.detach())


@contextlib.contextmanager
def normal_weights(modules: List[nn.Module]) -> Iterator[None]:
    """Every parameter as a frozen normal tensor sharing its memory; inference-tensor buffers likewise.

    The original Parameter and buffer objects are put back on exit, so their values, flags and identity are as
    they were; no weight is copied.
    """
    saved = []
    for module in {m for root in modules for m in root.modules()}:
        for name, parameter in module._parameters.items():
            if parameter is not None:
                saved.append((module._parameters, name, parameter))
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_inference():
                saved.append((module._buffers, name, buffer))
    try:
        for table, name, tensor in saved:
            view = _alias(tensor)
            table[name] = nn.Parameter(view, requires_grad=False) if isinstance(tensor, nn.Parameter) else view
        yield
    finally:
        for table, name, tensor in saved:
            table[name] = tensor


def _clone_input(_module: nn.Module, inputs: tuple):
    if not torch.is_grad_enabled():
        return None
    return (inputs[0].clone(), *inputs[1:])


@contextlib.contextmanager
def layer_norm_inputs_cloned(unet: nn.Module) -> Iterator[None]:
    """Each LayerNorm normalises a copy of its input while autograd records, so the in-place residual add after
    it does not change the tensor it saved for backward."""
    hooks = [m.register_forward_pre_hook(_clone_input) for m in unet.modules() if isinstance(m, nn.LayerNorm)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
