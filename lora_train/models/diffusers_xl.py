"""Standalone SDXL: a single-file checkpoint (converted by `sdxl_convert.py`) or a diffusers folder.

Conditioning, as diffusers' StableDiffusionXLPipeline computes it: crossattn = CLIP ViT-L's penultimate hidden
state joined on the feature axis with OpenCLIP bigG's penultimate one ([B, 77, 768 + 1280]); the vector is this
adapter's own layout, `cat(pooled, size_numbers)`: OpenCLIP's projected pooled output ([B, 1280]) then the six
numbers of the sample's SizeInfo (original h, w; crop top, left; target h, w). `predict` splits it back into
diffusers' `added_cond_kwargs` {"text_embeds", "time_ids"}, whose UNet embeds the numbers as sgm's does.
LoRA stems follow kohya's SDXL files: the UNet under its sgm (compvis) paths, `lora_te1_` for CLIP ViT-L and
`lora_te2_` for OpenCLIP bigG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from . import SizeInfo, TargetSpec
from .clip_tokenizer import EOS, cached_clip_tokenizer
from .conditioning import Cond
from .diffusers_model import CONFIG_DIR, DeferredWeights, DiffusersModel, SingleFile, load_model_config
from .sdxl_convert import (SIZE_NUMBERS, alphas_cumprod, convert_text_encoders, convert_vae, empty_unet,
                           prediction)
from ..targets import (SDXL_TEXT_ENCODER_PREFIXES, TEXT_ENCODER_BLOCKS, UNET_PREFIX, find_targets,
                       sdxl_diffusers_to_compvis_path, unet_blocks)

OPEN_CLIP_PAD = "!"  # SDXL's tokenizer_2 pads with "!" (token 0), as open_clip.tokenize pads with 0


class SdxlModel(DiffusersModel):
    """DiffusionModel over SDXL's diffusers/transformers components (two text encoders, size conditioning)."""

    size_conditioned = True  # the vector holds each sample's original size, crop and target size
    clip_skip = 1  # no skip beyond SDXL's own: both text encoders' penultimate layer

    def __init__(self, unet, vae, text_encoders: List[nn.Module], tokenizers: List, alphas_cumprod: torch.Tensor,
                 prediction: str, name: str, deferred_unet: Optional[DeferredWeights] = None):
        super().__init__(unet, vae, text_encoders[0], tokenizers[0], alphas_cumprod, prediction, "sdxl", name,
                         deferred_unet)
        self.text_encoder_2, self.tokenizer_2 = text_encoders[1], tokenizers[1]

    def lora_targets(self, spec: TargetSpec) -> Dict[str, nn.Module]:
        targets = find_targets(self.unet, unet_blocks(spec.conv), UNET_PREFIX, sdxl_diffusers_to_compvis_path)
        if spec.text_encoder:
            for prefix, encoder in zip(SDXL_TEXT_ENCODER_PREFIXES, (self.text_encoder, self.text_encoder_2)):
                targets.update(find_targets(encoder, TEXT_ENCODER_BLOCKS, prefix))
        return targets

    def encode_prompts(self, captions: List[str], sizes: List[SizeInfo]) -> Cond:
        self._bring_back()
        hidden = []
        for encoder, tokenizer in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)):
            tokens = tokenizer(list(captions), padding="max_length", truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt")
            output = encoder(tokens.input_ids.to(self.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        pooled = output.text_embeds
        numbers = torch.tensor([[*size.original, *size.crop_top_left, *size.target] for size in sizes],
                               dtype=pooled.dtype, device=pooled.device)
        return Cond(torch.cat(hidden, dim=-1), torch.cat([pooled, numbers], dim=1))

    def encoders(self) -> Dict[str, nn.Module]:
        self._bring_back()
        return {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self.unet.dtype
        vector = cond.vector.to(dtype)
        added = {"text_embeds": vector[:, :-SIZE_NUMBERS], "time_ids": vector[:, -SIZE_NUMBERS:]}
        return self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond.crossattn.to(dtype),
                         added_cond_kwargs=added).sample


def load_sdxl_file(path: Path, file: SingleFile, defer_unet: bool) -> SdxlModel:
    """An SDXL base checkpoint as an SdxlModel, its UNet left in the file until `load_unet()` with `defer_unet`."""
    from omegaconf import OmegaConf
    from transformers import CLIPTokenizer

    config = load_model_config(CONFIG_DIR / "sgm" / "sdxl.yaml")
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        config = OmegaConf.merge(config, load_model_config(beside))
    tokenizers = [CLIPTokenizer.from_pretrained(cached_clip_tokenizer(pad)) for pad in (EOS, OPEN_CLIP_PAD)]
    text_encoders = [encoder.to(device=file.device, dtype=file.dtype)
                     for encoder in convert_text_encoders(file.weights(torch.device("cpu")), config)]
    unet, unet_config = empty_unet(file.tensors, config)
    model = SdxlModel(unet=unet, vae=convert_vae(file.vae(), config), text_encoders=text_encoders,
                      tokenizers=tokenizers, alphas_cumprod=alphas_cumprod(config),
                      prediction=prediction(file.tensors, config), name=path.stem,
                      deferred_unet=file.deferred_unet(unet_config))
    if not defer_unet:
        model.load_unet()
    return model


def load_sdxl_folder(path: Path) -> SdxlModel:
    """An SDXL diffusers folder (unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    options = dict(local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **options)
    return SdxlModel(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **options),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **options),
        text_encoders=[CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **options),
                       CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **options)],
        tokenizers=[CLIPTokenizer.from_pretrained(path, subfolder=folder, **options)
                    for folder in ("tokenizer", "tokenizer_2")],
        alphas_cumprod=scheduler.alphas_cumprod, prediction=scheduler.config.prediction_type, name=path.name)
