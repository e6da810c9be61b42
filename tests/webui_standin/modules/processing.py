"""Stand-in for modules/processing.py: txt2img with the loaded checkpoint, as small as honest allows.

The dataclass fields are a subset of A1111 1.10's (an unknown keyword raises TypeError, as there). Sampling is
a plain DDIM loop over `sd_model.apply_model` with classifier-free guidance, then `decode_first_stage`, under
`torch.no_grad()`. Like A1111's default RNG, the initial noise comes from `torch.manual_seed(seed)` on the
global generator, so a generation changes the process RNG state. Prompts reach get_learned_conditioning as an
SdConditioning with the image's width and height (SDXL's size conditioning), and an SDXL conditioning is a dict.
Conditioning is cached on the class (`cached_c` / `cached_uc`) and kept after `close()` while
`opts.persistent_cond_cache` is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
import torch
from PIL import Image

from modules import prompt_parser, shared

opt_C = 4
opt_f = 8


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    negative_prompt: str = ""
    styles: List[str] = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: Dict[str, Any] = None
    override_settings: Dict[str, Any] = None
    override_settings_restore_afterwards: bool = True
    disable_extra_networks: bool = False

    cached_uc = [None, None]
    cached_c = [None, None]

    c: Any = field(default=None, init=False)
    uc: Any = field(default=None, init=False)
    sampler: Any = field(default=None, init=False)

    def __post_init__(self):
        self.styles = self.styles or []
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def get_conds_with_caching(self, prompts: List[str], cache: list):
        """The conditioning for prompts, from cache when the same prompts (and model) were encoded last."""
        key = (tuple(prompts), self.steps, shared.opts.CLIP_stop_at_last_layers, id(self.sd_model))
        if cache[0] != key:
            batch = prompt_parser.SdConditioning(prompts, width=self.width, height=self.height)
            cache[1] = self.sd_model.get_learned_conditioning(batch)
            cache[0] = key
        return cache[1]

    def setup_conds(self):
        self.uc = self.get_conds_with_caching([self.negative_prompt] * self.batch_size, self.cached_uc)
        self.c = self.get_conds_with_caching([self.prompt] * self.batch_size, self.cached_c)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError()

    def close(self):
        self.sampler = None
        self.c = None
        self.uc = None
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM from pure noise; updates state.sampling_step and stops early on Interrupt."""
        model, state = self.sd_model, shared.state
        alphas = model.alphas_cumprod.float()
        timesteps = torch.linspace(len(alphas) - 1, 0, self.steps).round().long().tolist()
        state.sampling_steps = self.steps
        x = noise
        for index, t in enumerate(timesteps):
            if state.interrupted or state.skipped:
                break
            state.sampling_step = index
            eps = self._guided_eps(x, t, alphas[t])
            alpha = alphas[t]
            alpha_next = alphas[timesteps[index + 1]] if index + 1 < len(timesteps) else torch.tensor(1.0)
            x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            x = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps
        return x

    def _guided_eps(self, x: torch.Tensor, t: int, alpha: torch.Tensor) -> torch.Tensor:
        model = self.sd_model
        dtype = next(model.model.parameters()).dtype
        timestep = torch.full((x.shape[0],), t, dtype=torch.long)
        out_uc = model.apply_model(x.to(dtype), timestep, _cast(self.uc, dtype)).float()
        out_c = model.apply_model(x.to(dtype), timestep, _cast(self.c, dtype)).float()
        out = out_uc + self.cfg_scale * (out_c - out_uc)
        if getattr(model, "parameterization", "eps") == "v":
            out = alpha.sqrt() * out + (1 - alpha).sqrt() * x
        return out


def _cast(cond, dtype):
    if isinstance(cond, dict):
        return {key: value.to(dtype) for key, value in cond.items()}
    return cond.to(dtype)


class Processed:
    def __init__(self, p: StableDiffusionProcessing, images_list, seed=-1, info=""):
        self.images = images_list
        self.prompt, self.negative_prompt = p.prompt, p.negative_prompt
        self.seed, self.info = seed, info
        self.width, self.height, self.steps, self.cfg_scale = p.width, p.height, p.steps, p.cfg_scale


def process_images(p: StableDiffusionProcessing) -> Processed:
    """n_iter batches of batch_size images; the state's job counters move as in A1111."""
    if p.sd_model is None:
        p.sd_model = shared.sd_model
    state = shared.state
    images: List[Image.Image] = []
    with torch.no_grad(), p.sd_model.ema_scope():
        if state.job_count == -1:
            state.job_count = p.n_iter
        for n in range(p.n_iter):
            if state.interrupted or state.stopping_generation:
                break
            p.setup_conds()
            if p.n_iter > 1:
                state.job = f"Batch {n + 1} out of {p.n_iter}"
            torch.manual_seed(p.seed + n)  # A1111's rng.randn seeds the global generator
            noise = torch.randn((p.batch_size, opt_C, p.height // opt_f, p.width // opt_f))
            samples = p.sample(noise)
            decoded = p.sd_model.decode_first_stage(samples.to(next(p.sd_model.parameters()).dtype)).float()
            images.extend(_to_image(x) for x in torch.clamp((decoded + 1.0) / 2.0, 0.0, 1.0))
            state.nextjob()
    return Processed(p, images, seed=p.seed)


def _to_image(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8))
