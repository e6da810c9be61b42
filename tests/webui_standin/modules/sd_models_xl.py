"""Stand-in for modules/sd_models_xl.py, on the tiny SDXL of lora_train.tiny_sdxl.

`DiffusionEngine` is the tiny model's class with the methods the WebUI calls on sgm's DiffusionEngine: sgm's own
(`ema_scope`, `encode_first_stage` with the scale factor applied, `decode_first_stage`) and the ones
sd_models_xl patches in (A1111 1.10.1): `get_learned_conditioning` (size from the batch's width/height, default
1024, crop from opts.sdxl_crop_top/left, aesthetic score from the refiner options), `apply_model`,
`get_first_stage_encoding` (the identity). `extend_sdxl` sets what A1111's extend_sdxl sets.
"""

from __future__ import annotations

import contextlib

import torch

from lora_train.tiny_sdxl import TinySdxl, sdxl_alphas_cumprod
from modules import devices, shared


class DiffusionEngine(TinySdxl):
    @contextlib.contextmanager
    def ema_scope(self, context=None):
        yield

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x).sample()

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, batch):
        for embedder in self.conditioner.embedders:
            embedder.ucg_rate = 0.0
        width = getattr(batch, 'width', 1024) or 1024
        height = getattr(batch, 'height', 1024) or 1024
        is_negative_prompt = getattr(batch, 'is_negative_prompt', False)
        opts = shared.opts
        aesthetic_score = opts.sdxl_refiner_low_aesthetic_score if is_negative_prompt else \
            opts.sdxl_refiner_high_aesthetic_score
        devices_args = dict(device=devices.device, dtype=devices.dtype)
        sdxl_conds = {
            "txt": batch,
            "original_size_as_tuple": torch.tensor([height, width], **devices_args).repeat(len(batch), 1),
            "crop_coords_top_left": torch.tensor([opts.sdxl_crop_top, opts.sdxl_crop_left],
                                                 **devices_args).repeat(len(batch), 1),
            "target_size_as_tuple": torch.tensor([height, width], **devices_args).repeat(len(batch), 1),
            "aesthetic_score": torch.tensor([aesthetic_score], **devices_args).repeat(len(batch), 1),
        }
        force_zero_negative_prompt = is_negative_prompt and all(x == '' for x in batch)
        return self.conditioner(sdxl_conds, force_zero_embeddings=['txt'] if force_zero_negative_prompt else [])

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)

    def get_first_stage_encoding(self, x):
        return x


def extend_sdxl(model):
    """Makes an SDXL model look like SD1 to the rest of the WebUI (A1111's extend_sdxl)."""
    model.model.diffusion_model.dtype = next(model.model.diffusion_model.parameters()).dtype
    model.model.conditioning_key = 'crossattn'
    model.cond_stage_key = 'txt'
    model.parameterization = "eps"  # EpsScaling in the tiny model's config (A1111: "v" for VScaling)
    model.alphas_cumprod = sdxl_alphas_cumprod()
    model.conditioner.wrapped = torch.nn.Module()
