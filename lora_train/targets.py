"""Which layers get adapters, and the kohya key stem each one is saved under.

Targets are declarative: the children (Linear, Conv2d) of blocks whose class name is in a set, as kohya
sd-scripts' `networks/lora.py` selects them. Stems are `<prefix>_<module path with . -> _>`. SD1/SD2 UNet stems
use diffusers module paths, so a UNet held with compvis (ldm) names is renamed by `compvis_to_diffusers_path`,
the inverse of the WebUI's `convert_diffusers_name_to_compvis` (extensions-builtin/Lora/networks.py). SDXL UNet
stems use the compvis (sgm) paths, so a diffusers SDXL UNet is renamed by `sdxl_diffusers_to_compvis_path`.

An OpenCLIP text tower (SD2's text encoder, SDXL's second, as the WebUI holds them) is named by the HF CLIP paths
kohya files use: resblock i's `attn` (a fused nn.MultiheadAttention) gives four `FusedProjection` targets
`..._layers_{i}_self_attn_{q,k,v,out}_proj`, its `mlp.c_fc`/`mlp.c_proj` the Linears `..._mlp_fc1`/`_fc2`.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, FrozenSet, Optional, Union

from torch import nn

from .fused_attention import FusedProjection
from .layers import is_adaptable

# Transformer blocks of the UNet: proj_in/out, attn1/attn2 q/k/v/out, ff (ldm and diffusers class names).
UNET_ATTENTION_BLOCKS = frozenset({"SpatialTransformer", "Transformer2DModel"})
# ResNet blocks and resamplers: the extra targets of LoCon (model.conv_rank > 0).
UNET_CONV_BLOCKS = frozenset({"ResBlock", "Downsample", "Upsample", "ResnetBlock2D", "Downsample2D", "Upsample2D"})
# CLIP text encoder layers as transformers holds them (eager, SDPA or flash attention): q/k/v/out_proj, mlp fc1/fc2.
TEXT_ENCODER_BLOCKS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"})

# OpenCLIP resblock: kohya stem suffix -> (module path in the block, projection of a fused attention or None).
OPEN_CLIP_LAYER_TARGETS = (
    ("self_attn_q_proj", "attn", "q"), ("self_attn_k_proj", "attn", "k"), ("self_attn_v_proj", "attn", "v"),
    ("self_attn_out_proj", "attn", "out"), ("mlp_fc1", "mlp.c_fc", None), ("mlp_fc2", "mlp.c_proj", None))

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"  # SD1/SD2's text encoder
SDXL_TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")  # SDXL's CLIP ViT-L, OpenCLIP bigG
TEXT_ENCODER_2_PREFIX = SDXL_TEXT_ENCODER_PREFIXES[1]

Target = Union[nn.Module, FusedProjection]  # what a stem adapts: a Linear, a Conv2d or a fused projection

_RESNET_SUFFIX = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                  "skip_connection": "conv_shortcut"}
_RESNET_SUFFIX_COMPVIS = {diffusers: compvis for compvis, diffusers in _RESNET_SUFFIX.items()}


def find_targets(root: nn.Module, blocks: FrozenSet[str], prefix: str,
                 rename: Optional[Callable[[str], str]] = None) -> Dict[str, nn.Module]:
    """Maps kohya stem -> Linear/Conv2d for every such child of a block whose class name is in `blocks`.

    Args:
        root: the model whose module paths name the stems (a UNet, or the HF CLIPTextModel).
        blocks: class names of the blocks whose layers are adapted.
        prefix: stem prefix, e.g. "lora_unet" or "lora_te".
        rename: maps a module path of root to the path the file format uses (compvis -> diffusers).
    """
    targets: Dict[str, nn.Module] = {}
    for block_path, block in root.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child_path, child in block.named_modules():
            if child_path and is_adaptable(child):
                path = f"{block_path}.{child_path}"
                path = rename(path) if rename else path
                targets[f"{prefix}_{path.replace('.', '_')}"] = child
    return targets


def find_open_clip_targets(text_model: nn.Module, prefix: str, layers: Optional[int] = None) -> Dict[str, Target]:
    """Maps kohya stem -> target for the first `layers` resblocks (None: all) of an OpenCLIP text tower.

    Args:
        text_model: an open_clip CLIP (or TextTransformer): what holds `transformer.resblocks`.
        prefix: "lora_te" (SD2) or "lora_te2" (SDXL's second text encoder).
        layers: how many resblocks the conditioning runs (SD2's penultimate layer leaves the last one out).
    """
    targets: Dict[str, Target] = {}
    for index, block in enumerate(list(text_model.transformer.resblocks)[:layers]):
        for suffix, path, part in OPEN_CLIP_LAYER_TARGETS:
            module = block.get_submodule(path)
            targets[f"{prefix}_text_model_encoder_layers_{index}_{suffix}"] = (
                FusedProjection(module, part) if part else module)
    return targets


def unet_blocks(conv: bool) -> FrozenSet[str]:
    return UNET_ATTENTION_BLOCKS | UNET_CONV_BLOCKS if conv else UNET_ATTENTION_BLOCKS


def compvis_to_diffusers_path(path: str) -> str:
    """Renames an SD1/SD2 ldm UNet module path to the diffusers path kohya files use.

    Assumes the SD1/SD2 layout of two ResNets per level (as the WebUI's loader does):
    input_blocks.4.1.proj_in -> down_blocks.1.attentions.0.proj_in,
    output_blocks.2.1.conv -> up_blocks.0.upsamplers.0.conv.
    """
    for pattern, convert in _COMPVIS_RULES:
        match = re.fullmatch(pattern, path)
        if match:
            return convert(*match.groups())
    raise ValueError(f"UNet module {path!r} has no diffusers name; the UNet layout is not SD1/SD2")


def _resnet(block: str, rest: str, names: Dict[str, str] = _RESNET_SUFFIX) -> str:
    for old, new in names.items():
        if rest == old or rest.startswith(old + "."):
            return f"{block}.{new}{rest[len(old):]}"
    raise ValueError(f"ResNet layer {rest!r} has no name in the other layout")


_COMPVIS_RULES = (
    (r"input_blocks\.(\d+)\.0\.op", lambda i: f"down_blocks.{int(i) // 3 - 1}.downsamplers.0.conv"),
    (r"input_blocks\.(\d+)\.0\.(.+)",
     lambda i, rest: _resnet(f"down_blocks.{(int(i) - 1) // 3}.resnets.{(int(i) - 1) % 3}", rest)),
    (r"input_blocks\.(\d+)\.1\.(.+)",
     lambda i, rest: f"down_blocks.{(int(i) - 1) // 3}.attentions.{(int(i) - 1) % 3}.{rest}"),
    (r"middle_block\.1\.(.+)", lambda rest: f"mid_block.attentions.0.{rest}"),
    (r"middle_block\.([02])\.(.+)", lambda i, rest: _resnet(f"mid_block.resnets.{int(i) // 2}", rest)),
    (r"output_blocks\.(\d+)\.[12]\.conv", lambda i: f"up_blocks.{int(i) // 3}.upsamplers.0.conv"),
    (r"output_blocks\.(\d+)\.0\.(.+)",
     lambda i, rest: _resnet(f"up_blocks.{int(i) // 3}.resnets.{int(i) % 3}", rest)),
    (r"output_blocks\.(\d+)\.1\.(.+)", lambda i, rest: f"up_blocks.{int(i) // 3}.attentions.{int(i) % 3}.{rest}"),
)


def sdxl_diffusers_to_compvis_path(path: str) -> str:
    """Renames a diffusers SDXL UNet module path to the sgm (compvis) path kohya's SDXL files use.

    Assumes SDXL's layout: two ResNets per level, and attention in every level that up-samples:
    down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in,
    up_blocks.0.upsamplers.0.conv -> output_blocks.2.2.conv.
    """
    for pattern, convert in _SDXL_DIFFUSERS_RULES:
        match = re.fullmatch(pattern, path)
        if match:
            return convert(*match.groups())
    raise ValueError(f"UNet module {path!r} has no compvis name; the UNet layout is not SDXL")


def _compvis_resnet(block: str, rest: str) -> str:
    return _resnet(block, rest, _RESNET_SUFFIX_COMPVIS)


_SDXL_DIFFUSERS_RULES = (
    (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
     lambda i, j, rest: _compvis_resnet(f"input_blocks.{3 * int(i) + int(j) + 1}.0", rest)),
    (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
     lambda i, j, rest: f"input_blocks.{3 * int(i) + int(j) + 1}.1.{rest}"),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda i: f"input_blocks.{3 * (int(i) + 1)}.0.op"),
    (r"mid_block\.attentions\.0\.(.+)", lambda rest: f"middle_block.1.{rest}"),
    (r"mid_block\.resnets\.(\d+)\.(.+)", lambda k, rest: _compvis_resnet(f"middle_block.{2 * int(k)}", rest)),
    (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
     lambda i, j, rest: _compvis_resnet(f"output_blocks.{3 * int(i) + int(j)}.0", rest)),
    (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
     lambda i, j, rest: f"output_blocks.{3 * int(i) + int(j)}.1.{rest}"),
    (r"up_blocks\.(\d+)\.upsamplers\.0\.conv", lambda i: f"output_blocks.{3 * int(i) + 2}.2.conv"),
)
