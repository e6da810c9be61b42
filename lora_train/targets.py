"""Which layers get adapters, and the kohya key stem each one is saved under.

Targets are declarative: the children (Linear, Conv2d) of blocks whose class name is in a set, as kohya
sd-scripts' `networks/lora.py` selects them. Stems are `<prefix>_<module path with . -> _>`. SD1/SD2 UNet stems
use diffusers module paths, so a UNet held with compvis (ldm) names is renamed by `compvis_to_diffusers_path`,
the inverse of the WebUI's `convert_diffusers_name_to_compvis` (extensions-builtin/Lora/networks.py).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, FrozenSet, Optional

from torch import nn

from .layers import is_adaptable

# Transformer blocks of the UNet: proj_in/out, attn1/attn2 q/k/v/out, ff (ldm and diffusers class names).
UNET_ATTENTION_BLOCKS = frozenset({"SpatialTransformer", "Transformer2DModel"})
# ResNet blocks and resamplers: the extra targets of LoCon (model.conv_rank > 0).
UNET_CONV_BLOCKS = frozenset({"ResBlock", "Downsample", "Upsample", "ResnetBlock2D", "Downsample2D", "Upsample2D"})
# CLIP text encoder layers as transformers holds them (eager, SDPA or flash attention): q/k/v/out_proj, mlp fc1/fc2.
TEXT_ENCODER_BLOCKS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"})

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"

_RESNET_SUFFIX = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                  "skip_connection": "conv_shortcut"}


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


def _resnet(block: str, rest: str) -> str:
    for compvis, diffusers in _RESNET_SUFFIX.items():
        if rest == compvis or rest.startswith(compvis + "."):
            return f"{block}.{diffusers}{rest[len(compvis):]}"
    raise ValueError(f"ResNet layer {rest!r} has no diffusers name")


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
