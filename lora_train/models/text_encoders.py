"""The text encoders of single-file checkpoints as transformers CLIP models, sized from their weights.

Widths and depths are read from the state dict, so any SD1/SD2/SDXL-layout checkpoint converts without a hub
download. Heads cannot be read from weights: they come from the local `version:` folder of the LDM/sgm config
(openai CLIP: SD1, SDXL's first), from open_clip's config of the `arch:` it names (OpenCLIP: SD2, SDXL's second),
else width / 64 (true for SD1.x, SD2.x and SDXL). SD2 uses the penultimate layer (`layer: penultimate`), so the
last block is left out, as the WebUI does; SDXL's OpenCLIP keeps it, for its pooled output.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from . import ModelLoadError
from .clip_tokenizer import cached_clip_tokenizer
from .common import empty_module

SD1_PREFIX = "cond_stage_model.transformer.text_model."
# openai CLIP ViT-L/14's text tower, SD1's text encoder
SD1_VIT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", max_position_embeddings=77, projection_dim=768)
SD2_PREFIX = "cond_stage_model.model."


def count_indexed(checkpoint: Dict[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest index the regex `pattern` captures in a key (0 when none matches)."""
    indices = {int(m.group(1)) for key in checkpoint for m in [re.match(pattern, key)] if m}
    return max(indices) + 1 if indices else 0


def sd1_vit_l_config():
    return _clip_config(**SD1_VIT_L)


def _clip_config(**values):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1, **values)


def openai_clip_config(checkpoint: Dict[str, torch.Tensor], local: Optional[Path], prefix: str = SD1_PREFIX):
    """The config of the openai-CLIP text model under `prefix` (transformers' names), or of the local folder."""
    from transformers import CLIPTextConfig

    if local is not None:
        return CLIPTextConfig.from_pretrained(local)
    width = checkpoint[prefix + "embeddings.token_embedding.weight"].shape[1]
    return _clip_config(
        hidden_size=width, num_attention_heads=max(1, width // 64), hidden_act="quick_gelu",
        num_hidden_layers=count_indexed(checkpoint, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
        intermediate_size=checkpoint[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_position_embeddings=checkpoint[prefix + "embeddings.position_embedding.weight"].shape[0],
        projection_dim=width)


def open_clip_config(checkpoint: Dict[str, torch.Tensor], params: Any, prefix: str = SD2_PREFIX,
                     drop_skipped_layer: bool = True):
    """The config of the OpenCLIP text tower under `prefix`; `params` are its embedder's (arch, layer).

    drop_skipped_layer: leave out the last block when the embedder takes the penultimate layer (SD2).
    """
    width = checkpoint[prefix + "token_embedding.weight"].shape[1]
    blocks = count_indexed(checkpoint, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    penultimate = str(params.get("layer", "last")) == "penultimate"
    projection = checkpoint.get(prefix + "text_projection")
    return _clip_config(
        hidden_size=width,
        num_attention_heads=_open_clip_heads(str(params.get("arch", "")), width) or max(1, width // 64),
        hidden_act="gelu", num_hidden_layers=blocks - 1 if penultimate and drop_skipped_layer else blocks,
        intermediate_size=checkpoint[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        max_position_embeddings=checkpoint[prefix + "positional_embedding"].shape[0],
        projection_dim=projection.shape[1] if projection is not None else width)


def _open_clip_heads(arch: str, width: int) -> Optional[int]:
    """The heads of open_clip's `arch` when its text tower has the checkpoint's width (else the arch is not it)."""
    try:
        from open_clip import get_model_config
    except ImportError:
        return None
    text = (get_model_config(arch) or {}).get("text_cfg", {}) if arch else {}
    return text.get("heads") if text.get("width") == width else None


def with_position_ids(model):
    """CLIP's position_ids buffer (0..n-1), which some checkpoints leave out, made real if it is not."""
    embeddings = model.text_model.embeddings
    if embeddings.position_ids.is_meta:
        count = embeddings.position_embedding.num_embeddings
        embeddings.position_ids = torch.arange(count).expand((1, -1))
    return model


def convert_text_encoder(checkpoint: Dict[str, torch.Tensor], config: Any, family: str) -> Tuple[Any, Any]:
    """(CLIPTextModel, CLIPTokenizer) for the checkpoint's text encoder; `config` is its LDM config."""
    from transformers import CLIPTextModel, CLIPTokenizer

    params = config.model.params.cond_stage_config.get("params", {}) or {}
    version = str(params.get("version", "") or "")
    local = Path(version) if version and Path(version).is_dir() else None
    if family == "sd1":
        from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_clip_checkpoint

        empty = empty_module(CLIPTextModel, config=openai_clip_config(checkpoint, local))
        text_encoder = with_position_ids(convert_ldm_clip_checkpoint(checkpoint, text_encoder=empty))
        return text_encoder, CLIPTokenizer.from_pretrained(local if local else cached_clip_tokenizer())
    return convert_open_clip(checkpoint, open_clip_config(checkpoint, params)), \
        CLIPTokenizer.from_pretrained(cached_clip_tokenizer(pad_token="!"))


_OPEN_CLIP_TO_HF = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                   ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))


def convert_open_clip(checkpoint: Dict[str, torch.Tensor], clip_config, prefix: str = SD2_PREFIX,
                      with_projection: bool = False) -> Any:
    """OpenCLIP's text tower (fused q/k/v in_proj) as a CLIPTextModel with separate q/k/v projections; with
    `with_projection` a CLIPTextModelWithProjection whose `text_embeds` are OpenCLIP's pooled, projected output."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    width, layers = clip_config.hidden_size, clip_config.num_hidden_layers
    state = {"text_model.embeddings.token_embedding.weight": checkpoint[prefix + "token_embedding.weight"],
             "text_model.embeddings.position_embedding.weight": checkpoint[prefix + "positional_embedding"],
             "text_model.final_layer_norm.weight": checkpoint[prefix + "ln_final.weight"],
             "text_model.final_layer_norm.bias": checkpoint[prefix + "ln_final.bias"]}
    if with_projection:  # OpenCLIP computes x @ P; a Linear holds P transposed
        state["text_projection.weight"] = checkpoint[prefix + "text_projection"].T.contiguous()
    for layer in range(layers):
        source, target = f"{prefix}transformer.resblocks.{layer}.", f"text_model.encoder.layers.{layer}."
        for kind in ("weight", "bias"):
            fused = checkpoint[f"{source}attn.in_proj_{kind}"]
            for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
                state[f"{target}self_attn.{name}.{kind}"] = fused[index * width:(index + 1) * width]
        for key in [key for key in checkpoint if key.startswith(source) and ".in_proj_" not in key]:
            rest = key[len(source):]
            for old, new in _OPEN_CLIP_TO_HF:
                rest = rest.replace(old, new)
            state[target + rest] = checkpoint[key]  # read only now: a file-backed checkpoint reads what it needs
    model = empty_module(CLIPTextModelWithProjection if with_projection else CLIPTextModel, config=clip_config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    with_position_ids(model)
    if unexpected or [key for key in missing if not key.endswith("position_ids")]:
        raise ModelLoadError(f"the OpenCLIP text encoder does not convert (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); put the model's own .yaml beside it with the same name")
    return model
