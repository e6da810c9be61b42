"""Tiny, randomly initialised SDXL-topology models in the original (sgm) layout, for the tests and benchmarks.

`build_tiny_sdxl(seed)` returns a module laid out as generative-models' `DiffusionEngine` (the class the WebUI holds
an SDXL checkpoint in): `model.diffusion_model` (the UNet: SDXL's 3 levels, attention at 2 and 4x down-sampling,
linear proj_in/out, `label_emb` for the vector conditioning), `conditioner.embedders` (CLIP ViT-L's place: a
transformers CLIPTextModel, penultimate layer; OpenCLIP bigG's place: an open_clip text tower with fused
`nn.MultiheadAttention`, penultimate layer plus the projected pooled output; three size/crop embedders) and
`first_stage_model` (the VAE). Its state dict has the key layout of an SDXL `.safetensors` file as people
download it; `build_tiny_sdxl_checkpoint` writes one. Only the widths are tiny.

sgm itself is not on PyPI: the UNet and VAE are ldm's classes (sgm's are copies of them with the same parameter
names), the encoders are transformers' and open_clip's own, and the conditioner reproduces sgm's
`GeneralConditioner` contract: every embedder's output goes to "crossattn" (3-D, joined on the feature axis) or
"vector" (2-D, joined on axis 1).
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from .tiny import LDM_CONFIG, randomise_zero_weights

TE1_WIDTH, TE2_WIDTH, TE2_EMBED = 32, 64, 32  # SDXL: 768, 1280, 1280
SIZE_EMBED = 256  # per number of a size/crop pair, as SDXL (ConcatTimestepEmbedderND outdim)
CONTEXT_DIM = TE1_WIDTH + TE2_WIDTH
ADM_IN_CHANNELS = TE2_EMBED + 3 * 2 * SIZE_EMBED
SCALE_FACTOR = 0.13025
UNET_CONFIG = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2],
                   num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=16, use_spatial_transformer=True,
                   use_linear_in_transformer=True, transformer_depth=1, context_dim=CONTEXT_DIM, legacy=False)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """[N] -> [N, dim]: cos then sin of values at geometric frequencies (ldm/sgm `timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ClipEmbedder(nn.Module):
    """sgm's FrozenCLIPEmbedder with layer "hidden": a hidden state of a transformers CLIPTextModel."""

    input_key = "txt"

    def __init__(self, transformer: nn.Module, tokenizer, layer_idx: int):
        super().__init__()
        self.transformer, self.tokenizer, self.layer_idx = transformer, tokenizer, layer_idx
        self.is_trainable, self.ucg_rate, self.legacy_ucg_val = False, 0.0, None

    def forward(self, text: List[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(text), truncation=True, max_length=77, padding="max_length",
                                return_tensors="pt").input_ids
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        return self.transformer(input_ids=tokens.to(device), output_hidden_states=True).hidden_states[self.layer_idx]


class OpenClipEmbedder(nn.Module):
    """sgm's FrozenOpenCLIPEmbedder2 (penultimate layer, always_return_pooled, not legacy) over open_clip's CLIP."""

    input_key = "txt"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.is_trainable, self.ucg_rate, self.legacy_ucg_val = False, 0.0, None

    def forward(self, text: List[str]):
        import open_clip

        tokens = open_clip.tokenize(list(text)).to(self.model.token_embedding.weight.device)
        x = (self.model.token_embedding(tokens) + self.model.positional_embedding).permute(1, 0, 2)
        blocks = self.model.transformer.resblocks
        for index, block in enumerate(blocks):
            if index == len(blocks) - 1:
                penultimate = x.permute(1, 0, 2)
            x = block(x, attn_mask=self.model.attn_mask)
        last = self.model.ln_final(x.permute(1, 0, 2))
        pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ self.model.text_projection
        return penultimate, pooled


class SizeEmbedder(nn.Module):
    """sgm's ConcatTimestepEmbedderND: each number of a [B, 2] size or crop embedded and concatenated."""

    def __init__(self, input_key: str, outdim: int = SIZE_EMBED):
        super().__init__()
        self.input_key, self.outdim = input_key, outdim
        self.is_trainable, self.ucg_rate, self.legacy_ucg_val = False, 0.0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dims = x.shape
        return sinusoidal_embedding(x.reshape(-1), self.outdim).reshape(batch, dims * self.outdim)


class Conditioner(nn.Module):
    """sgm's GeneralConditioner: 3-D outputs -> "crossattn" (joined on dim 2), 2-D -> "vector" (dim 1).

    Embedders that are not `is_trainable` run without gradient, and the outputs of embedders whose input key is in
    `force_zero_embeddings` are zeros, as in sgm.
    """

    def __init__(self, embedders: List[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch: Dict, force_zero_embeddings=None) -> Dict[str, torch.Tensor]:
        output: Dict[str, List[torch.Tensor]] = {"crossattn": [], "vector": []}
        for embedder in self.embedders:
            with contextlib.nullcontext() if embedder.is_trainable else torch.no_grad():
                out = embedder(batch[embedder.input_key])
            for emb in out if isinstance(out, (list, tuple)) else [out]:
                if embedder.input_key in (force_zero_embeddings or []):
                    emb = torch.zeros_like(emb)
                output["crossattn" if emb.dim() == 3 else "vector"].append(emb)
        return {"crossattn": torch.cat(output["crossattn"], 2), "vector": torch.cat(output["vector"], 1)}


class UNetWrapper(nn.Module):
    """sgm's OpenAIWrapper: the UNet under `diffusion_model`, called with the conditioner's dict."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"))


class TinySdxl(nn.Module):
    """The parts of a DiffusionEngine that hold weights, with its attribute names."""

    def __init__(self, unet: nn.Module, conditioner: Conditioner, vae: nn.Module):
        super().__init__()
        self.model, self.conditioner, self.first_stage_model = UNetWrapper(unet), conditioner, vae
        self.scale_factor = SCALE_FACTOR


def _unet() -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(num_classes="continuous", **UNET_CONFIG)  # "continuous": forward adds label_emb(y)
    width = unet.model_channels * 4
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(ADM_IN_CHANNELS, width), nn.SiLU(), nn.Linear(width, width)))
    return unet


def _open_clip_text() -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=TE2_WIDTH, heads=2, layers=3)
    model = CLIP(TE2_EMBED, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32), text)
    del model.visual
    return model


def _clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .models.clip_tokenizer import cached_clip_tokenizer

    config = CLIPTextConfig(vocab_size=49408, hidden_size=TE1_WIDTH, intermediate_size=TE1_WIDTH * 2,
                            projection_dim=TE1_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
                            pad_token_id=1)
    return CLIPTextModel(config), CLIPTokenizer.from_pretrained(cached_clip_tokenizer())


def build_tiny_sdxl(seed: int = 0) -> TinySdxl:
    """A tiny SDXL-topology model, randomly initialised from `seed` (zero-initialised outputs re-randomised)."""
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    transformer, tokenizer = _clip_text()
    embedders = [ClipEmbedder(transformer, tokenizer, layer_idx=-2), OpenClipEmbedder(_open_clip_text()),
                 *(SizeEmbedder(key) for key in ("original_size_as_tuple", "crop_coords_top_left",
                                                 "target_size_as_tuple"))]
    vae_config = OmegaConf.create(copy.deepcopy(LDM_CONFIG["model"]["params"]["first_stage_config"]))
    model = TinySdxl(_unet(), Conditioner(embedders), instantiate_from_config(vae_config)).eval()
    return randomise_zero_weights(model, seed + 1)


def sdxl_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """SDXL's noise schedule (sgm's LegacyDDPMDiscretization: scaled-linear betas 0.00085..0.012)."""
    from .models.common import scaled_linear_alphas_cumprod

    return scaled_linear_alphas_cumprod(0.00085, 0.012, steps)


def build_tiny_sdxl_checkpoint(folder: Path, name: str = "tiny-sdxl", v_prediction: bool = False,
                               seed: int = 0) -> Path:
    """Writes <folder>/<name>.safetensors in the layout of a downloaded SDXL file; a v-prediction file carries the
    `v_pred` marker key (as NoobAI's v-pred releases do, read by ComfyUI and the WebUI)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous() for key, value in build_tiny_sdxl(seed).state_dict().items()}
    if v_prediction:
        tensors["v_pred"] = torch.tensor([])
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
