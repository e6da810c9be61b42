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

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from . import ModelLoadError, SizeInfo, TargetSpec
from .common import checkpointed, empty_module, frozen, load_weights, scaled_linear_alphas_cumprod
from .conditioning import Cond
from .detect import detect_family
from .families import SUPPORTED
from .safetensors_file import SafetensorsFile
from .text_encoders import convert_text_encoder
from ..runtime import Offloader
from ..targets import TEXT_ENCODER_BLOCKS, TEXT_ENCODER_PREFIX, UNET_PREFIX, find_targets, unet_blocks

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class DiffusersModel:
    """DiffusionModel over diffusers/transformers components."""

    size_conditioned = False  # the conditioning depends on the caption only
    clip_skip = 1  # the text encoder's last layer (SD2's conversion already leaves out the one it skips)

    def __init__(self, unet, vae, text_encoder, tokenizer, alphas_cumprod: torch.Tensor, prediction: str,
                 family: str, name: str, deferred_unet: Optional["DeferredWeights"] = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.alphas_cumprod = alphas_cumprod.float()
        self.prediction, self.family, self.name = prediction, family, name
        self.deferred_unet = deferred_unet  # the UNet's weights while they are still in the file (it is empty)
        self._away: Optional[Offloader] = None  # encoders a run left offloaded, brought back when next used

    @property
    def device(self) -> torch.device:
        return self.deferred_unet.device if self.deferred_unet else self.unet.device

    def load_unet(self) -> None:
        """Reads a deferred UNet's weights from its file, tensor by tensor; nothing when they are in memory."""
        if self.deferred_unet:
            load_weights(self.unet, self.deferred_unet.read(), "UNet")
            self.deferred_unet = None

    def restore_when_used(self, offloader: Offloader) -> None:
        """Keeps the encoders a run offloaded away until they are used again (the next run, an encode), so the
        end of a run never holds them beside the UNet; a CLI run that ends there never reads them back."""
        self._away = offloader

    def _bring_back(self) -> None:
        if self._away is not None:
            self._away, away = None, self._away
            away.restore()

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "DiffusersModel":
        """Moves the components (a deferred UNet is read first); the VAE stays fp32 (SD VAEs overflow in fp16)."""
        self.load_unet()
        self._bring_back()
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
        self._bring_back()
        posterior = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        return posterior.sample() * self.vae.config.scaling_factor

    def encode_prompts(self, captions: List[str], sizes: List[SizeInfo]) -> Cond:
        self._bring_back()
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        return Cond(self.text_encoder(tokens.input_ids.to(self.device))[0])

    def encoders(self) -> Dict[str, nn.Module]:
        self._bring_back()
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


class DeferredWeights:
    """A component's converted state dict, read from its file when `read()` is called, on `device`."""

    def __init__(self, read: Callable[[], Dict[str, torch.Tensor]], device: torch.device):
        self.read, self.device = read, device


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


class SingleFile:
    """Opens a checkpoint file for one component: read in the run's dtype (`weights`) or fp32 (`vae`)."""

    def __init__(self, path: Path, device: torch.device, dtype: Optional[torch.dtype]):
        self.path, self.device, self.dtype = path, device, dtype
        self.tensors = self.weights()  # the header is read here: a damaged file fails before anything is built

    def weights(self, device: Optional[torch.device] = None) -> SafetensorsFile:
        try:
            return SafetensorsFile(self.path, self.dtype, device or self.device)
        except OSError as error:
            raise ModelLoadError(f"{self.path.name} cannot be read ({error}); check the path") from None

    def vae(self) -> SafetensorsFile:
        return SafetensorsFile(self.path, None if self.dtype is None else torch.float32, self.device)

    def deferred_unet(self, diffusers_config: Dict[str, Any]) -> DeferredWeights:
        from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_unet_checkpoint

        return DeferredWeights(lambda: convert_ldm_unet_checkpoint(self.weights(), diffusers_config), self.device)


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


def load_model_config(path: Path) -> Any:
    """An LDM/sgm .yaml as an OmegaConf config."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path)
    except Exception as error:  # omegaconf/yaml raise several error types for a broken file
        raise ModelLoadError(f"{path}: cannot read the model config ({error}); fix or remove it") from None


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

