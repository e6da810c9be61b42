"""The LoRA file: kohya tensors and metadata, atomic and non-clobbering writes, and that another loader
(diffusers `load_lora_weights`) reads it with no unmatched key and reproduces our adapters' image."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_train.config import TrainConfig
from lora_train.dataset import load_dataset
from lora_train.config import DataConfig
from lora_train.export import OutputExistsError, build_metadata, save_lora
from lora_train.models.diffusers import load_diffusers_model
from lora_train.pipeline import build_network

PROMPT = "demo style, a red circle"
REQUIRED_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
                     "ss_output_name", "ss_training_comment", "ss_tag_frequency", "ss_num_train_images",
                     "ss_steps", "ss_epoch", "ss_learning_rate", "ss_resolution", "ss_sd_model_name",
                     "ss_clip_skip", "sshs_model_hash", "modelspec.architecture", "modelspec.title",
                     "modelspec.sai_model_spec")


def trained_looking_network(config, model):
    network = build_network(config, model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for adapter in network.adapters.values():
            weight = adapter.lora_up.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return network


@pytest.fixture
def setup(tiny_checkpoint, sample_images, tmp_path):
    config = TrainConfig(data=DataConfig(train_data_dir=str(sample_images), resolution=64, min_bucket_reso=64,
                                         max_bucket_reso=128))
    config.model.lora_rank, config.model.alpha = 4, 2.0
    config.output.output_dir, config.output.output_name = str(tmp_path / "out"), "exported"
    model = load_diffusers_model(str(tiny_checkpoint))
    return config, model, load_dataset(config.data)


def export(config, model, dataset, network, precision="fp32"):
    metadata = build_metadata(config, model, network, dataset, steps=10, epoch=1)
    return save_lora(config.output.lora_path, network.state_dict(), metadata, precision)


def generate(model, lora_path=None, network=None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear",
                                                                            beta_start=0.00085, beta_end=0.012),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora_path is not None:
        pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    handle = network.attach() if network is not None else None
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    if handle is not None:
        handle.detach()
    return torch.from_numpy(image)


def test_file_holds_exactly_the_network_tensors_in_kohya_names(setup):
    config, model, dataset = setup
    network = trained_looking_network(config, model)
    path = export(config, model, dataset, network, precision="fp16")
    tensors = load_file(str(path))
    stems = set(network.adapters)
    assert set(tensors) == {f"{s}.{n}" for s in stems for n in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert len([s for s in stems if s.startswith("lora_unet_")]) == 192


def test_metadata_is_complete_and_hash_covers_tensor_data(setup):
    config, model, dataset = setup
    path = export(config, model, dataset, trained_looking_network(config, model))
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    assert not missing
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == "4"
    assert json.loads(metadata["ss_tag_frequency"])["root"]["demo style"] == 8
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()


def test_existing_file_is_never_overwritten_unless_asked(setup):
    config, model, dataset = setup
    network = trained_looking_network(config, model)
    path = export(config, model, dataset, network)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        export(config, model, dataset, network)
    assert path.read_bytes() == before
    save_lora(path, network.state_dict(), {}, "bf16", overwrite=True)
    assert load_file(str(path))[next(iter(network.state_dict()))].dtype == torch.bfloat16
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left behind"


def test_diffusers_loads_the_file_and_reproduces_our_image(setup):
    config, model, dataset = setup
    network = trained_looking_network(config, model)
    path = export(config, model, dataset, network)
    baseline = generate(model)
    ours = generate(model, network=network)
    assert (ours - baseline).abs().max() > 1e-3, "the adapters must change the image for the test to mean anything"
    theirs = generate(model, lora_path=path)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-4)


def test_diffusers_loader_refuses_a_key_that_matches_no_layer(setup, tmp_path):
    """The control for the test above: the loader is strict, so loading our file proves zero unmatched keys."""
    config, model, dataset = setup
    tensors = trained_looking_network(config, model).state_dict()
    stray = "lora_unet_down_blocks_7_attentions_0_proj_in"
    tensors.update({f"{stray}.lora_down.weight": torch.zeros(4, 32), f"{stray}.lora_up.weight": torch.zeros(32, 4),
                    f"{stray}.alpha": torch.tensor(4.0)})
    path = save_lora(tmp_path / "stray.safetensors", tensors, {}, "fp32")
    with pytest.raises((AttributeError, ValueError)):
        generate(model, lora_path=path)


def test_the_file_gets_the_users_umask_and_the_precision_actually_used(setup):
    config, model, dataset = setup
    config.training.mixed_precision = "fp16"  # asked for, but the CPU trains in fp32
    previous = os.umask(0o022)
    try:
        path = export(config, model, dataset, trained_looking_network(config, model))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644, "readable by a WebUI running as another user"
    with safe_open(str(path), "pt") as file:
        assert file.metadata()["ss_mixed_precision"] == "no"
