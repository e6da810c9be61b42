"""Stand-in for Forge's modules/processing.py: txt2img through the engine, its LoRA builtin and its caches.

`<lora:name:weight>` in the prompt goes to `networks.load_networks` (a prompt without one unloads LoRAs), the
patchers are loaded through the memory manager (which merges or unmerges), the conditioning is cached on the class
(`cached_c` / `cached_uc`: [key, cond, extra params], the key holding the prompt and the LoRA names, not the file),
and Euler sampling over `KModel.apply_model` runs under inference mode, as in Forge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from PIL import Image

import networks
from backend import memory_management
from modules import sd_models, shared

LORA = re.compile(r"<lora:([^:>]+)(?::([0-9.]+))?>")


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str = None  # the stand-in samples with Euler whatever is named, as a sampler Forge has
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False

    cached_c = [None, None, None]
    cached_uc = [None, None, None]

    def close(self):
        pass

    def conditioning(self, prompt: str, loras: list, cache: list):
        key = (prompt, str(loras), shared.opts.CLIP_stop_at_last_layers)
        if cache[0] != key:
            self.sd_model.set_clip_skip(shared.opts.CLIP_stop_at_last_layers)
            cache[:] = [key, self.sd_model.get_learned_conditioning([prompt]), {}]
        return cache[1]


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


class Processed:
    def __init__(self, images):
        self.images = images


def _euler(p, c, uc, noise):
    k_model, state = p.sd_model.forge_objects.unet.model, shared.state
    sigmas = k_model.predictor.sigmas
    indexes = torch.linspace(len(sigmas) - 1, 0, p.steps).round().long()
    schedule = torch.cat([sigmas[indexes], torch.zeros(1)])
    x = noise * schedule[0]
    state.sampling_steps = p.steps
    for step in range(p.steps):
        state.sampling_step = step
        sigma = schedule[step].reshape(1)
        denoised_uc = k_model.apply_model(x, sigma, c_crossattn=uc)
        denoised_c = k_model.apply_model(x, sigma, c_crossattn=c)
        denoised = denoised_uc + p.cfg_scale * (denoised_c - denoised_uc)
        x = x + (x - denoised) / sigma * (schedule[step + 1] - sigma)
    return x


def process_images(p) -> Processed:
    engine, _ = sd_models.forge_model_reload()
    p.sd_model = engine
    loras = [(name, float(weight or 1.0)) for name, weight in LORA.findall(p.prompt)]
    prompt = LORA.sub("", p.prompt)
    networks.load_networks([name for name, _ in loras], [w for _, w in loras], [w for _, w in loras])
    objects = engine.forge_objects
    with torch.inference_mode():
        memory_management.load_models_gpu([objects.unet, objects.clip.patcher, objects.vae.patcher])
        c = p.conditioning(prompt, loras, StableDiffusionProcessing.cached_c)
        uc = p.conditioning(p.negative_prompt, loras, StableDiffusionProcessing.cached_uc)
        torch.manual_seed(p.seed)
        samples = _euler(p, c, uc, torch.randn(1, 4, p.height // 8, p.width // 8))
        decoded = engine.decode_first_stage(samples)
    images: List[Image.Image] = [_image(x) for x in torch.clamp((decoded.float() + 1) / 2, 0, 1)]
    shared.state.nextjob()
    return Processed(images)


def _image(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((255.0 * np.moveaxis(x.numpy(), 0, 2)).astype(np.uint8))
