"""Standalone training's models: a single-file .safetensors checkpoint or a diffusers folder, loaded by diffusers.

What a file is comes from `detect.py`; SDXL files and folders load in `diffusers_xl.py`, SD1/SD2 here. An SD1/SD2
single file is converted in memory with diffusers' own LDM converters. Its LDM config is the `.yaml` with the
same name beside it (as the WebUI does), else the bundled SD1/SD2 config for the family found in the state-dict
keys; SD2 eps vs v is then told by the WebUI's test (a v-model pushes a constant input strongly negative).
The text encoder is sized from its weights and the CLIP tokenizer built from open_clip's vocabulary
(`text_encoders.py`), so nothing is fetched from a hub. Pickled .ckpt/.pt files are refused: loading them can run code.
A single file is read tensor by tensor, each cast to the run's dtype as it is read (`safetensors_file.py`); with
`defer_unet` the UNet stays in the file until `load_unet()`, which the trainer calls once the caches are filled and
the encoders are away, so a run on the CPU never holds the encoders and the UNet at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from . import ModelLoadError
from .common import empty_module, load_weights, scaled_linear_alphas_cumprod
from .detect import detect_family
from .diffusers_model import CONFIG_DIR, DiffusersModel, SingleFile, load_model_config
from .families import SUPPORTED
from .text_encoders import convert_text_encoder

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def load_diffusers_model(base_model: str, device: Optional[torch.device] = None,
                         dtype: Optional[torch.dtype] = None, defer_unet: bool = False) -> DiffusersModel:
    """Loads a .safetensors checkpoint or a diffusers folder on `device` (default: the CPU) in `dtype` (default:
    the file's precision; the VAE fp32 whenever a dtype is given).

    A single file's tensors become the weights as they are read and cast, one at a time (nothing is initialised
    and then overwritten, no second copy); `defer_unet` leaves the UNet's in the file until `load_unet()`.

    Raises:
        ModelLoadError: a pickle file, an unknown file type, or not an SD1/SD2/SDXL base model.
    """
    path = Path(base_model)
    device = torch.device(device or "cpu")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is a folder but not a diffusers model (no model_index.json)")
        model = _load_folder(path)
        return model.to(device, dtype) if dtype is not None or device.type != "cpu" else model
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded, so it is refused. "
            "Convert it once to .safetensors (e.g. the WebUI's Checkpoint Merger with 'safetensors' selected) "
            "and point model.base_model at the new file")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name}: use a .safetensors checkpoint or a diffusers folder")
    return _load_single_file(path, SingleFile(path, device, dtype), defer_unet)


def _load_folder(path: Path) -> DiffusersModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (path / "text_encoder").is_dir():
        what = "an SDXL refiner" if (path / "text_encoder_2").is_dir() else "a model without a text encoder"
        raise ModelLoadError(f"{path.name} is {what}; this trains {SUPPORTED} base models. Point "
                             "model.base_model at one of those")
    if (path / "text_encoder_2").is_dir():
        from .diffusers_xl import load_sdxl_folder

        return load_sdxl_folder(path)
    options = dict(local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **options)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **options)
    family = "sd2" if text_encoder.config.hidden_act == "gelu" else "sd1"
    return DiffusersModel(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **options),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **options),
        text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **options),
        alphas_cumprod=scheduler.alphas_cumprod, prediction=scheduler.config.prediction_type, family=family,
        name=path.name)


def _load_single_file(path: Path, file: SingleFile, defer_unet: bool) -> DiffusersModel:
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import create_unet_diffusers_config

    family = detect_family(file.tensors, path.name)
    if family == "sdxl":
        from .diffusers_xl import load_sdxl_file

        return load_sdxl_file(path, file, defer_unet)
    beside = path.with_suffix(".yaml")
    config = load_model_config(beside if beside.is_file() else CONFIG_DIR / "ldm" / f"{family}.yaml")
    text_encoder, tokenizer = convert_text_encoder(file.weights(torch.device("cpu")), config, family)
    unet_config = create_unet_diffusers_config(config, image_size=512)
    v_test = family == "sd2" and not beside.is_file()  # only the UNet itself tells SD2 eps from v
    model = DiffusersModel(unet=empty_module(UNet2DConditionModel, **unet_config),
                           vae=_convert_vae(file.vae(), config),
                           text_encoder=text_encoder.to(device=file.device, dtype=file.dtype), tokenizer=tokenizer,
                           alphas_cumprod=_alphas_cumprod(file.tensors, config),
                           prediction=_configured_prediction(config), family=family, name=path.stem,
                           deferred_unet=file.deferred_unet(unet_config))
    if v_test or not defer_unet:
        model.load_unet()
    if v_test:
        model.prediction = "v_prediction" if _pushes_constant_negative(model.unet) else "epsilon"
    return model


def _convert_vae(checkpoint: Dict[str, torch.Tensor], config: Any) -> nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (convert_ldm_vae_checkpoint,
                                                                        create_vae_diffusers_config)

    vae_config = create_vae_diffusers_config(config, image_size=512)
    vae = empty_module(AutoencoderKL, **vae_config, scaling_factor=float(config.model.params.scale_factor))
    load_weights(vae, convert_ldm_vae_checkpoint(checkpoint, vae_config), "VAE")
    return vae


def _configured_prediction(config: Any) -> str:
    v = config.model.params.get("parameterization", "eps") == "v"
    return "v_prediction" if v else "epsilon"


@torch.no_grad()
def _pushes_constant_negative(unet: nn.Module) -> bool:
    """The WebUI's SD2 v-model test: at t=999 a v-model's output for a constant 0.5 input is far below it."""
    x = torch.full((1, 4, 8, 8), 0.5, dtype=unet.dtype)
    cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=unet.dtype)
    return (unet(x, torch.tensor([999]), encoder_hidden_states=cond).sample - x).mean().item() < -1


def _alphas_cumprod(checkpoint: Dict[str, torch.Tensor], config: Any) -> torch.Tensor:
    if "alphas_cumprod" in checkpoint:
        return checkpoint["alphas_cumprod"].float()
    params = config.model.params
    return scaled_linear_alphas_cumprod(params.linear_start, params.linear_end, params.timesteps)

