"""Standalone model loading: SD1 and SD2 single-file checkpoints convert from their own weights, offline."""

from __future__ import annotations

import torch
import yaml
from safetensors import safe_open

from lora_train.config import DataConfig, TrainConfig
from lora_train.models import SizeInfo, TargetSpec
from lora_train.models.diffusers import load_diffusers_model
from lora_train.pipeline import train_lora
from tiny_sd2 import TEXT_BLOCKS, TEXT_HEADS

PROMPT = "demo style, a red circle"


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
