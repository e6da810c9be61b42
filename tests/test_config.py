"""Config: defaults, the default YAML, and a clear error naming the key and the fix for every user mistake."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from lora_train.cli import main
from lora_train.config import (DEFAULT_CONFIG_PATH, ConfigError, TrainConfig, config_from_dict, load_config,
                               save_config)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path


def valid(folder, **sections):
    values = {"data": {"train_data_dir": str(folder / "images")},
              "model": {"base_model": str(folder / "model.safetensors")}}
    for section, overrides in sections.items():
        values.setdefault(section, {}).update(overrides)
    return values


def test_defaults_are_the_proven_starting_point():
    config = TrainConfig()
    assert (config.model.lora_rank, config.model.alpha, config.model.dropout) == (8, 8.0, 0.0)
    assert (config.training.batch_size, config.training.epochs, config.training.learning_rate) == (4, 10, 2e-4)
    assert config.training.gradient_accumulation_steps == 1


def test_default_yaml_equals_the_dataclass_defaults_and_comments_every_key():
    assert config_from_dict(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())) == TrainConfig()
    text = DEFAULT_CONFIG_PATH.read_text()
    keys = [line for line in text.splitlines() if re.match(r"^\s+\w+:", line)]
    sections = [getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)]
    assert len(keys) == sum(len(dataclasses.fields(section)) for section in sections)
    uncommented = [line for line in keys if "#" not in line]
    assert not uncommented


def test_yaml_round_trip(folder):
    config = config_from_dict(valid(folder, training={"lr_scheduler": "cosine", "min_snr_gamma": 5},
                                    output={"output_dir": str(folder / "out")}))
    save_config(config, folder / "saved.yaml")
    assert load_config(folder / "saved.yaml") == config


def test_relative_paths_resolve_against_the_yaml_folder(folder):
    (folder / "run.yaml").write_text(yaml.safe_dump({"data": {"train_data_dir": "images"},
                                                     "model": {"base_model": "model.safetensors"}}))
    config = load_config(folder / "run.yaml").validate()
    assert config.data.train_data_dir == str((folder / "images").resolve())


def test_scientific_notation_without_a_dot_is_a_number(folder):
    assert config_from_dict(valid(folder, training={"learning_rate": "1e-4"})).training.learning_rate == 1e-4


@pytest.mark.parametrize("sections, message", [
    ({"training": {"learning_rat": 1e-4}}, "training.learning_rat: unknown key; did you mean training.learning_rate?"),
    ({"trainig": {}}, "trainig: unknown section; did you mean 'training'?"),
    ({"training": {"batch_size": "four"}}, "training.batch_size: 'four' is not valid; use a int value"),
    ({"training": {"batch_size": 0}}, "training.batch_size: 0 is not valid; use a value >= 1"),
    ({"data": {"flip_aug": "yes"}}, "data.flip_aug: 'yes' is not valid; use true or false"),
    ({"data": {"resolution": 500}}, "data.resolution: 500 is not valid; use a multiple of 64"),
    ({"data": {"repeats": 0}}, "data.repeats: 0 is not valid; use a value >= 1"),
    ({"data": {"keep_tokens": -1}}, "data.keep_tokens: -1 is not valid; use a value >= 0"),
    ({"data": {"caption_dropout": 1.5}}, "data.caption_dropout: 1.5 is not valid; use a value <= 1.0"),
    ({"data": {"caption_extension": "txt"}}, "data.caption_extension: 'txt' is not valid; start it with a dot"),
    ({"training": {"optimizer": "adamw"}}, "use one of AdamW, AdamW8bit, Prodigy, Lion (did you mean 'AdamW'?)"),
    ({"training": {"lr_scheduler": "cosin"}}, "(did you mean 'cosine'?)"),
    ({"training": {"learning_rate": 2}}, "training.learning_rate: 2.0 is not valid; use a value in (0, 1]"),
    ({"model": {"dropout": 1.5}}, "model.dropout: 1.5 is not valid; use a value <= 0.9"),
    ({"output": {"output_name": "../escape"}}, "output.output_name: '../escape' is not valid; use a plain file name"),
    ({"output": {"save_precision": "fp8"}}, "output.save_precision: 'fp8' is not valid; use one of fp16, bf16, fp32"),
    ({"model": {"prediction": "v-prediction"}},
     "model.prediction: 'v-prediction' is not valid; use one of auto, epsilon, v_prediction (did you mean "
     "'v_prediction'?)"),
    ({"training": {"zero_terminal_snr": "on"}}, "training.zero_terminal_snr: 'on' is not valid; use true or false"),
    ({"model": {"prediction": "epsilon"}, "training": {"zero_terminal_snr": True}},
     "training.zero_terminal_snr: True is not valid; the model predicts epsilon"),
])
def test_bad_values_name_the_key_and_the_fix(folder, sections, message):
    with pytest.raises(ConfigError) as error:
        config_from_dict(valid(folder, **sections)).validate()
    assert message in str(error.value)


def test_missing_folder_and_files_are_named(folder):
    with pytest.raises(ConfigError, match="data.train_data_dir: .* the folder does not exist"):
        config_from_dict(valid(folder, data={"train_data_dir": str(folder / "nope")})).validate()
    with pytest.raises(ConfigError, match="model.base_model: .* the checkpoint does not exist"):
        config_from_dict(valid(folder, model={"base_model": str(folder / "nope.safetensors")})).validate()
    with pytest.raises(ConfigError, match="model.base_model: '' is not valid; set it"):
        config_from_dict(valid(folder, model={"base_model": ""})).validate()
    with pytest.raises(ConfigError, match="config file .* does not exist"):
        load_config(folder / "missing.yaml")


def test_broken_yaml_is_a_config_error(folder):
    (folder / "bad.yaml").write_text("data:\n  train_data_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(folder / "bad.yaml")


def test_cli_reports_a_user_mistake_in_one_line(folder, capsys):
    (folder / "bad.yaml").write_text(yaml.safe_dump(valid(folder, training={"epochs": -1})))
    assert main(["train", "--config", str(folder / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: training.epochs: -1 is not valid; use a value >= 1"


def test_cli_refuses_pickle_checkpoints_with_the_reason(folder, capsys):
    (folder / "model.ckpt").write_bytes(b"pickle")
    (folder / "run.yaml").write_text(yaml.safe_dump(valid(folder, model={"base_model": str(folder / "model.ckpt")})))
    (folder / "images" / "a.png").write_bytes(b"")
    from PIL import Image
    Image.new("RGB", (64, 64)).save(folder / "images" / "a.png")
    assert main(["train", "--config", str(folder / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.ckpt is a pickle checkpoint") and "safetensors" in err


def test_cli_refuses_a_file_that_is_not_a_checkpoint(folder, capsys):
    from safetensors.torch import save_file
    import torch

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    from PIL import Image
    Image.new("RGB", (64, 64)).save(folder / "images" / "a.png")
    (folder / "run.yaml").write_text(yaml.safe_dump(valid(folder)))
    assert main(["train", "--config", str(folder / "run.yaml")]) == 2
    assert "not a Stable Diffusion base model (no text-encoder weights; a LoRA" in capsys.readouterr().err
