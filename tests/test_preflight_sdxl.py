"""The memory preflight models SDXL: the UNet, both text encoders and the VAE at the weights' own dtype, and the
probe forward runs through SDXL's conditioning (crossattn and vector), for the WebUI's and the standalone adapter."""

from __future__ import annotations

import pytest
import torch

from lora_train.config import DataConfig, TrainConfig
from lora_train.models.diffusers import load_diffusers_model
from lora_train.preflight import activation_bytes_per_pixel, estimate_memory
from lora_train.tiny_sdxl import build_tiny_sdxl_checkpoint


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return load_diffusers_model(str(build_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl"))))


def config(cached_text: bool, train_text_encoder: bool) -> TrainConfig:
    config = TrainConfig(data=DataConfig(resolution=1024))
    config.training.batch_size, config.training.cache_text_encoder_outputs = 1, cached_text
    config.model.train_text_encoder = train_text_encoder
    return config


def test_the_estimate_counts_both_text_encoders_and_the_vae_unless_they_are_offloaded(sdxl):
    encoders = sum(weight_bytes(m) for m in (sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2))
    assert weight_bytes(sdxl.text_encoder_2) > 0 and weight_bytes(sdxl.text_encoder) > 0
    unet = weight_bytes(sdxl.unet)
    resident = estimate_memory(sdxl, config(cached_text=True, train_text_encoder=True), (1024, 1024), 1000, 1.0)
    offloaded = estimate_memory(sdxl, config(cached_text=True, train_text_encoder=False), (1024, 1024), 1000, 1.0)
    assert resident.weights == unet + encoders
    assert offloaded.weights == unet
    half = sdxl.unet.to(torch.float16)
    try:
        assert estimate_memory(sdxl, config(True, False), (1024, 1024), 1000, 1.0).weights == unet // 2
    finally:
        half.to(torch.float32)


def test_the_probe_runs_sdxl_conditioning_and_scales_with_the_latent_area(sdxl):
    per_pixel = activation_bytes_per_pixel(sdxl)
    assert per_pixel > 0
    small = estimate_memory(sdxl, config(True, False), (512, 512), 1000, per_pixel)
    large = estimate_memory(sdxl, config(True, False), (1024, 1024), 1000, per_pixel)
    assert large.activations == pytest.approx(4 * small.activations, rel=1e-6)
