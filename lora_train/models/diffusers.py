"""Standalone training's models: a single-file .safetensors checkpoint or a diffusers folder, loaded by diffusers.

What a file is comes from `detect.py`; SDXL files and folders load in `diffusers_xl.py`, SD1/SD2 here. An SD1/SD2
single file is converted in memory with diffusers' own LDM converters. Its LDM config is the `.yaml` with the
same name beside it (as the WebUI does), else the bundled SD1/SD2 config for the family found in the state-dict
keys; SD2 eps vs v is then told by the WebUI's test (a v-model pushes a constant input strongly negative).
The text encoder is sized from its weights and the CLIP tokenizer built from open_clip's vocabulary
(`text_encoders.py`), so nothing is fetched from a hub. Pickled .ckpt/.pt files are refused: loading them can run code.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch
from torch import nn

from . import ModelLoadError, SizeInfo, TargetSpec
from .common import checkpointed, empty_module, frozen, load_weights, scaled_linear_alphas_cumprod
from .conditioning import Cond
from .detect import detect_family
from .families import SUPPORTED
from .text_encoders import convert_text_encoder
from ..targets import TEXT_ENCODER_BLOCKS, TEXT_ENCODER_PREFIX, UNET_PREFIX, find_targets, unet_blocks

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class DiffusersModel:
    """DiffusionModel over diffusers/transformers components."""

    size_conditioned = False  # the conditioning depends on the caption only
    clip_skip = 1  # the text encoder's last layer (SD2's conversion already leaves out the one it skips)

    def __init__(self, unet, vae, text_encoder, tokenizer, alphas_cumprod: torch.Tensor, prediction: str,
                 family: str, name: str):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.alphas_cumprod = alphas_cumprod.float()
        self.prediction, self.family, self.name = prediction, family, name

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "DiffusersModel":
        """Moves the components; the VAE stays fp32 (SD VAEs overflow in fp16)."""
        self.unet.to(device, dtype)
        for role, component in self.encoders().items():
            component.to(device, torch.float32 if role == "vae" else dtype)
        return self

    def lora_targets(self, spec: TargetSpec) -> Dict[str, nn.Module]:
        targets = find_targets(self.unet, unet_blocks(spec.conv), UNET_PREFIX)
        if spec.text_encoder:
            targets.update(find_targets(self.text_encoder, TEXT_ENCODER_BLOCKS, TEXT_ENCODER_PREFIX))
        return targets

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        return posterior.sample() * self.vae.config.scaling_factor

    def encode_prompts(self, captions: List[str], sizes: List[SizeInfo]) -> Cond:
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        return Cond(self.text_encoder(tokens.input_ids.to(self.device))[0])

    def encoders(self) -> Dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self.unet.dtype
        return self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond.crossattn.to(dtype)).sample

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool, text_encoder: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for component in (self.unet, *self.encoders().values()):
                stack.enter_context(frozen(component))
            if gradient_checkpointing:
                unet = self.unet
                stack.enter_context(checkpointed([*unet.down_blocks, unet.mid_block, *unet.up_blocks]))
            yield


def load_diffusers_model(base_model: str) -> DiffusersModel:
    """Loads a .safetensors checkpoint or a diffusers folder on the CPU, in the file's precision.

    A single file's tensors become the weights (nothing is initialised and then overwritten), so loading
    takes about the file's size in memory; `DiffusersModel.to(device, dtype)` then places and casts them.

    Raises:
        ModelLoadError: a pickle file, an unknown file type, or not an SD1/SD2/SDXL base model.
    """
    path = Path(base_model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is a folder but not a diffusers model (no model_index.json)")
        return _load_folder(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded, so it is refused. "
            "Convert it once to .safetensors (e.g. the WebUI's Checkpoint Merger with 'safetensors' selected) "
            "and point model.base_model at the new file")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name}: use a .safetensors checkpoint or a diffusers folder")
    return _load_single_file(path)


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


def _load_single_file(path: Path) -> DiffusersModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        checkpoint = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:  # a damaged file; never an interrupt
        raise ModelLoadError(f"{path.name} cannot be read as safetensors ({error}); re-download it") from None
    family = detect_family(checkpoint, path.name)
    if family == "sdxl":
        from .diffusers_xl import load_sdxl_file

        return load_sdxl_file(path, checkpoint)
    beside = path.with_suffix(".yaml")
    config = load_model_config(beside if beside.is_file() else CONFIG_DIR / "ldm" / f"{family}.yaml")
    unet = _convert_unet(checkpoint, config)
    prediction = _prediction(config, family, unet, explicit=beside.is_file())
    text_encoder, tokenizer = convert_text_encoder(checkpoint, config, family)
    return DiffusersModel(unet=unet, vae=_convert_vae(checkpoint, config), text_encoder=text_encoder,
                          tokenizer=tokenizer, alphas_cumprod=_alphas_cumprod(checkpoint, config),
                          prediction=prediction, family=family, name=path.stem)


def load_model_config(path: Path) -> Any:
    """An LDM/sgm .yaml as an OmegaConf config."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path)
    except Exception as error:  # omegaconf/yaml raise several error types for a broken file
        raise ModelLoadError(f"{path}: cannot read the model config ({error}); fix or remove it") from None


def _convert_unet(checkpoint: Dict[str, torch.Tensor], config: Any) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (convert_ldm_unet_checkpoint,
                                                                        create_unet_diffusers_config)

    unet_config = create_unet_diffusers_config(config, image_size=512)
    unet = empty_module(UNet2DConditionModel, **unet_config)
    load_weights(unet, convert_ldm_unet_checkpoint(checkpoint, unet_config), "UNet")
    return unet


def _convert_vae(checkpoint: Dict[str, torch.Tensor], config: Any) -> nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (convert_ldm_vae_checkpoint,
                                                                        create_vae_diffusers_config)

    vae_config = create_vae_diffusers_config(config, image_size=512)
    vae = empty_module(AutoencoderKL, **vae_config, scaling_factor=float(config.model.params.scale_factor))
    load_weights(vae, convert_ldm_vae_checkpoint(checkpoint, vae_config), "VAE")
    return vae


def _prediction(config: Any, family: str, unet: nn.Module, explicit: bool) -> str:
    if explicit or family == "sd1":
        v = config.model.params.get("parameterization", "eps") == "v"
        return "v_prediction" if v else "epsilon"
    return "v_prediction" if _pushes_constant_negative(unet) else "epsilon"


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

