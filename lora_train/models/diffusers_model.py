"""The standalone DiffusionModel over diffusers components (SD1/SD2; SDXL's subclass is in `diffusers_xl.py`) and
what the loaders share: the bundled config folder, a model config file, a checkpoint file read per component in
the run's dtype, a UNet whose weights are read only when the trainer asks for them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from . import ModelLoadError, SizeInfo, TargetSpec
from .common import checkpointed, frozen, load_weights
from .conditioning import Cond
from .safetensors_file import SafetensorsFile
from ..runtime import Offloader
from ..targets import TEXT_ENCODER_BLOCKS, TEXT_ENCODER_PREFIX, UNET_PREFIX, find_targets, unet_blocks

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class DiffusersModel:
    """DiffusionModel over diffusers/transformers components."""

    relayout = True  # the run may give the UNet's convolution weights channels-last order, and put them back

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

    def release_encoders(self, offloader: Offloader) -> None:
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


def load_model_config(path: Path) -> Any:
    """An LDM/sgm .yaml as an OmegaConf config."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path)
    except Exception as error:  # omegaconf/yaml raise several error types for a broken file
        raise ModelLoadError(f"{path}: cannot read the model config ({error}); fix or remove it") from None
