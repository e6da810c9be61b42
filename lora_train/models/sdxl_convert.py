"""An SDXL single-file checkpoint (sgm layout, as people download it) as diffusers/transformers components.

Everything the weights can tell is read from them: the UNet's levels, channels, transformer depths, context width
and size-embedding width; the VAE's channels; both text encoders' widths and depths. What they cannot tell comes
from the sgm `.yaml` with the checkpoint's name beside it, else from the bundled `configs/sgm/sdxl.yaml`:
attention head size (`network_config.params.num_head_channels`, SDXL: 64), the text encoders' heads (a local
`version:` folder for CLIP, open_clip's `arch:` for OpenCLIP), the VAE's `scale_factor` and the noise schedule.
v-prediction is read from a `v_pred` key in the file (as ComfyUI and the WebUI read it) or the `.yaml` beside it
(sgm's `VScaling` denoiser, or `parameterization: v`). Tensors become the weights: nothing is initialised twice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from . import ModelLoadError
from .common import empty_module, load_weights, scaled_linear_alphas_cumprod
from .text_encoders import convert_open_clip, count_indexed, open_clip_config, openai_clip_config, with_position_ids

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."
TE2_PREFIX = "conditioner.embedders.1.model."
V_PRED_KEY = "v_pred"
SIZE_NUMBERS = 6  # the size conditioning: original (h, w), crop (top, left), target (h, w)
DEFAULT_HEAD_CHANNELS = 64


def unet_config(checkpoint: Dict[str, torch.Tensor], network: Any) -> Dict[str, Any]:
    """diffusers UNet2DConditionModel config of the sgm UNet in `checkpoint`; `network` = network_config.params."""
    downsamplers = sorted(int(m.group(1)) for key in checkpoint
                          for m in [re.fullmatch(re.escape(UNET) + r"input_blocks\.(\d+)\.0\.op\.weight", key)] if m)
    if not downsamplers:
        raise ModelLoadError("the checkpoint's UNet has no down-sampling blocks; it is not an SDXL UNet")
    resnets, levels = downsamplers[0] - 1, len(downsamplers) + 1
    firsts = [f"{UNET}input_blocks.{level * (resnets + 1) + 1}." for level in range(levels)]
    channels = [checkpoint[first + "0.out_layers.3.weight"].shape[0] for first in firsts]
    depths = [_transformer_depth(checkpoint, first + "1.") for first in firsts]
    if _transformer_depth(checkpoint, UNET + "middle_block.1.") != depths[-1]:
        raise ModelLoadError("the checkpoint's middle block and deepest level differ in transformer depth; "
                             "it is not an SDXL UNet")
    proj_in = next(checkpoint[first + "1.proj_in.weight"] for first, depth in zip(firsts, depths) if depth)
    cross = checkpoint[next(key for key in checkpoint if key.startswith(UNET) and key.endswith("attn2.to_k.weight"))]
    adm = checkpoint[UNET + "label_emb.0.0.weight"].shape[1]
    pooled = checkpoint[TE2_PREFIX + "text_projection"].shape[1]
    conv_in = checkpoint[UNET + "input_blocks.0.0.weight"]
    return dict(
        sample_size=128, in_channels=conv_in.shape[1], out_channels=checkpoint[UNET + "out.2.weight"].shape[0],
        down_block_types=tuple("CrossAttnDownBlock2D" if depth else "DownBlock2D" for depth in depths),
        up_block_types=tuple("CrossAttnUpBlock2D" if depth else "UpBlock2D" for depth in reversed(depths)),
        block_out_channels=tuple(channels), layers_per_block=resnets,
        transformer_layers_per_block=tuple(depth or 1 for depth in depths), cross_attention_dim=cross.shape[1],
        attention_head_dim=tuple(_heads(width, network) for width in channels),
        use_linear_projection=proj_in.dim() == 2, class_embed_type=None, addition_embed_type="text_time",
        addition_time_embed_dim=(adm - pooled) // SIZE_NUMBERS, projection_class_embeddings_input_dim=adm)


def _transformer_depth(checkpoint: Dict[str, torch.Tensor], block: str) -> int:
    return count_indexed(checkpoint, re.escape(block) + r"transformer_blocks\.(\d+)\.")


def _heads(width: int, network: Any) -> int:
    """Attention heads at a level (diffusers calls them attention_head_dim): fixed, or width / head size."""
    heads = int(network.get("num_heads", -1) or -1)
    return heads if heads > 0 else max(1, width // int(network.get("num_head_channels", DEFAULT_HEAD_CHANNELS)))


def vae_config(checkpoint: Dict[str, torch.Tensor], scaling_factor: float) -> Dict[str, Any]:
    """diffusers AutoencoderKL config of the ldm VAE in `checkpoint`."""
    levels = count_indexed(checkpoint, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    return dict(
        in_channels=checkpoint[VAE + "encoder.conv_in.weight"].shape[1],
        out_channels=checkpoint[VAE + "decoder.conv_out.weight"].shape[0],
        latent_channels=checkpoint[VAE + "post_quant_conv.weight"].shape[0],
        block_out_channels=tuple(checkpoint[f"{VAE}encoder.down.{level}.block.0.conv2.weight"].shape[0]
                                 for level in range(levels)),
        layers_per_block=count_indexed(checkpoint, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\."),
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        sample_size=1024, scaling_factor=scaling_factor)


def empty_unet(checkpoint: Dict[str, torch.Tensor], config: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """(the UNet with its weights on the meta device, its diffusers config); the weights are loaded apart."""
    from diffusers import UNet2DConditionModel

    diffusers_config = unet_config(checkpoint, config.model.params.network_config.get("params", {}) or {})
    return empty_module(UNet2DConditionModel, **diffusers_config), diffusers_config


def convert_vae(checkpoint: Dict[str, torch.Tensor], config: Any) -> nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_vae_checkpoint

    diffusers_config = vae_config(checkpoint, float(config.model.params.scale_factor))
    vae = empty_module(AutoencoderKL, **diffusers_config)
    load_weights(vae, convert_ldm_vae_checkpoint(checkpoint, diffusers_config), "VAE")
    return vae


def convert_text_encoders(checkpoint: Dict[str, torch.Tensor], config: Any) -> List[nn.Module]:
    """[CLIPTextModel (CLIP ViT-L), CLIPTextModelWithProjection (OpenCLIP bigG, all layers for its pooled output)]."""
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    embedders = config.model.params.conditioner_config.params.emb_models
    clip_params, open_clip_params = (embedders[index].get("params", {}) or {} for index in (0, 1))
    version = str(clip_params.get("version", "") or "")
    local = Path(version) if version and Path(version).is_dir() else None
    empty = empty_module(CLIPTextModel, config=openai_clip_config(checkpoint, local, TE1_PREFIX))
    first = with_position_ids(convert_ldm_clip_checkpoint(checkpoint, text_encoder=empty))
    second_config = open_clip_config(checkpoint, open_clip_params, TE2_PREFIX, drop_skipped_layer=False)
    return [first, convert_open_clip(checkpoint, second_config, TE2_PREFIX, with_projection=True)]


def prediction(checkpoint: Dict[str, torch.Tensor], config: Any) -> str:
    """"v_prediction" when the file carries `v_pred` or its config scales for v, else "epsilon"."""
    params = config.model.params
    scaling = str(params.get("denoiser_config", {}).get("params", {}).get("scaling_config", {}).get("target", ""))
    v = V_PRED_KEY in checkpoint or scaling.endswith("VScaling") or params.get("parameterization", "eps") == "v"
    return "v_prediction" if v else "epsilon"


def alphas_cumprod(config: Any) -> torch.Tensor:
    """sgm's LegacyDDPMDiscretization of the config (scaled-linear betas)."""
    denoiser = config.model.params.denoiser_config.get("params", {})
    schedule = denoiser.get("discretization_config", {}).get("params", {}) or {}
    return scaled_linear_alphas_cumprod(float(schedule.get("linear_start", 0.00085)),
                                        float(schedule.get("linear_end", 0.012)), int(denoiser.get("num_idx", 1000)))
