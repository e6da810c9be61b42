"""Standalone model loading: SD1 and SD2 single-file checkpoints convert from their own weights, offline."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from lora_train.config import DataConfig, TrainConfig
from lora_train.models import SizeInfo, TargetSpec
from lora_train.models.diffusers import load_diffusers_model
from lora_train.pipeline import train_lora
from lora_train.tiny import LDM_CONFIG, build_tiny_ldm

OPEN_CLIP_ARCH = "ViT-tiny-lora-train-test"
TEXT_WIDTH, TEXT_HEADS, TEXT_BLOCKS = 64, 2, 3
PROMPT = "demo style, a red circle"


@pytest.fixture(scope="module")
def tiny_sd2_checkpoint(tmp_path_factory):
    """An SD2-layout (OpenCLIP text encoder, linear proj, v-prediction) checkpoint with its .yaml beside it."""
    import open_clip

    folder = tmp_path_factory.mktemp("sd2")
    arch = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": TEXT_HEADS,
                         "layers": TEXT_BLOCKS}}
    (folder / f"{OPEN_CLIP_ARCH}.json").write_text(json.dumps(arch))
    open_clip.add_model_config(folder / f"{OPEN_CLIP_ARCH}.json")
    config = copy.deepcopy(LDM_CONFIG)
    params = config["model"]["params"]
    params["parameterization"] = "v"
    unet = params["unet_config"]["params"]
    unet.pop("num_heads")
    unet.update(num_head_channels=16, use_linear_in_transformer=True, context_dim=TEXT_WIDTH)
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {
        "arch": OPEN_CLIP_ARCH, "version": None, "device": "cpu", "freeze": True, "layer": "penultimate"}}
    model = build_tiny_ldm(config, seed=3)
    path = folder / "tiny-sd2-v.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    return path, model


def test_sd2_text_encoder_converts_from_its_weights_and_matches_ldm(tiny_sd2_checkpoint):
    path, ldm_model = tiny_sd2_checkpoint
    model = load_diffusers_model(str(path))
    assert (model.family, model.prediction) == ("sd2", "v_prediction")
    assert model.text_encoder.config.num_hidden_layers == TEXT_BLOCKS - 1  # the penultimate layer
    assert model.text_encoder.config.num_attention_heads == TEXT_HEADS
    with torch.no_grad():
        ours = model.encode_prompts([PROMPT], [SizeInfo.square(64)]).crossattn
        theirs = ldm_model.get_learned_conditioning([PROMPT])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_sd2_checkpoint_trains_with_text_encoder_adapters(tiny_sd2_checkpoint, sample_images, tmp_path):
    path, _ = tiny_sd2_checkpoint
    model = load_diffusers_model(str(path))
    assert sum(s.startswith("lora_te_") for s in model.lora_targets(TargetSpec())) == 6 * (TEXT_BLOCKS - 1)
    config = TrainConfig(data=DataConfig(train_data_dir=str(sample_images), resolution=64, min_bucket_reso=64))
    config.model.base_model, config.model.lora_rank, config.model.alpha = str(path), 4, 4.0
    config.training.max_train_steps, config.training.batch_size = 2, 4
    config.output.output_dir = str(tmp_path)
    result = train_lora(config.validate(), model)
    with safe_open(str(result.lora_path), "pt") as file:
        metadata = file.metadata()
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v2_v", "True")


def test_sd1_text_encoder_is_sized_from_its_weights_without_a_config_folder(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "no-folder.safetensors"
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    config = yaml.safe_load(tiny_checkpoint.with_suffix(".yaml").read_text())
    config["model"]["params"]["cond_stage_config"]["params"]["version"] = "openai/clip-vit-large-patch14"
    checkpoint.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    reference = load_diffusers_model(str(tiny_checkpoint)).text_encoder.config
    derived = load_diffusers_model(str(checkpoint)).text_encoder.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
        assert getattr(derived, key) == getattr(reference, key), key
