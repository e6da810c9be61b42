"""Built-in presets: the SDXL preset's keys and values, how the tab lists, loads and protects them, and the tab
choosing the SDXL preset by itself when the loaded checkpoint is SDXL (stand-in WebUI, tests/webui_standin)."""

from __future__ import annotations

import re

import pytest
import yaml

from lora_train.config import DEFAULT_CONFIG_PATH, ConfigError, TrainConfig, config_from_dict
from lora_train.jobs import JobRunner
from lora_train.webui import actions
from lora_train.webui.a1111 import A1111Host
from lora_train.webui.form import form_fields
from lora_train.webui.host import CheckpointFacts
from webui_standin import installed

SDXL_PRESET = actions.BUILTIN_PRESETS["sdxl"]
KEY_LINE = re.compile(r"^(\w+):|^\s+(\w+):")


def commented_keys(path):
    """["section.key", ...] in file order, and the keys whose line has no comment."""
    keys, uncommented, section = [], [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        match = KEY_LINE.match(line)
        if match and match.group(1):
            section = match.group(1)
        elif match:
            keys.append(f"{section}.{match.group(2)}")
            if "#" not in line:
                uncommented.append(keys[-1])
    return keys, uncommented


def test_the_sdxl_preset_has_the_default_keys_each_with_a_comment():
    keys, uncommented = commented_keys(SDXL_PRESET)
    assert keys == commented_keys(DEFAULT_CONFIG_PATH)[0]
    assert not uncommented


def test_the_sdxl_preset_is_a_12_gb_starting_point():
    config = config_from_dict(yaml.safe_load(SDXL_PRESET.read_text(encoding="utf-8")))
    data, model, train = config.data, config.model, config.training
    assert (data.resolution, data.enable_bucket, data.shuffle_captions) == (1024, True, False)
    assert (model.lora_rank, model.alpha, model.train_text_encoder, model.prediction) == (16, 16.0, False, "auto")
    assert (train.batch_size, train.learning_rate, train.optimizer, train.min_snr_gamma) == (1, 1e-4, "AdamW", 5.0)
    assert train.gradient_checkpointing and train.cache_latents and train.cache_text_encoder_outputs
    assert train.mixed_precision == "bf16" and not train.zero_terminal_snr
    assert config != TrainConfig()


def test_built_in_presets_are_listed_first_loaded_and_never_overwritten(tmp_path):
    (tmp_path / "mine.yaml").write_text("model:\n  lora_rank: 4\n")
    (tmp_path / "sdxl.yaml").write_text("model:\n  lora_rank: 2\n")  # a user file cannot shadow a built-in
    assert actions.list_presets(tmp_path) == ["default", "sdxl", "mine"]
    assert actions.load_preset(tmp_path, "sdxl").data.resolution == 1024
    assert actions.load_preset(tmp_path, "mine").model.lora_rank == 4
    with pytest.raises(ConfigError, match="preset name 'sdxl': use a plain name .* not 'default' or 'sdxl'"):
        actions.save_preset(tmp_path, "sdxl", TrainConfig().to_dict())


@pytest.mark.parametrize("family, preset", [("sdxl", "sdxl"), ("sd1", "default"), ("sd2", "default"),
                                            (None, "default")])
def test_each_family_starts_from_its_preset(family, preset):
    assert actions.preset_for(family) == preset


def test_the_host_tells_the_loaded_models_family(tiny_ldm, tmp_path):
    with installed(tiny_ldm, tmp_path / "webui"):
        assert A1111Host().checkpoint_facts().family == "sd1"
        webui_model = A1111Host().sd_model()
        webui_model.model.diffusion_model.in_channels = 9  # an inpainting UNet: not one we train
        assert A1111Host().checkpoint_facts().family is None
        webui_model.model.diffusion_model.in_channels = 4
    with installed(None, tmp_path / "empty"):
        assert actions.loaded_family(A1111Host()) is None


class SdxlHost(A1111Host):
    """The real host, reporting an SDXL checkpoint (the SDXL stand-in model is not needed to pick a preset)."""

    def checkpoint_facts(self):
        return CheckpointFacts("an sdxl checkpoint", "sdxl", {})


def page_load_outputs(tab):
    """{label or elem_id: value} that the tab's page-load handler gives its components."""
    [index] = [i for i, dependency in enumerate(tab.dependencies) if dependency["trigger"] == "load"]
    values = tab.fns[index].fn()
    blocks = [tab.blocks[block] for block in tab.dependencies[index]["outputs"]]
    return {block.label: value for block, value in zip(blocks, values)}


def test_the_tab_picks_the_sdxl_preset_for_an_sdxl_checkpoint(tiny_ldm, tmp_path):
    import gradio as gr
    from lora_train.webui import ui

    with installed(tiny_ldm, tmp_path / "webui"):
        outputs = page_load_outputs(ui.build(JobRunner(), SdxlHost()))
    assert outputs["Preset"] == "sdxl"
    assert (outputs["Resolution"], outputs["Batch size"], outputs["LoRA rank"]) == (1024, 1, 16)
    assert outputs["Train text encoder"] is False and outputs["Gradient checkpointing"] is True
    assert outputs["Output name (the LoRA's file name)"] == gr.update(), "the name stays the one proposed"
    assert len(outputs) == 1 + len(form_fields()) + 8  # the folder, its report, grid and gallery, the three
    # preview settings, the test name


def test_the_tab_leaves_the_form_alone_for_an_sd1_checkpoint(tiny_ldm, tmp_path):
    from lora_train.webui import ui

    with installed(tiny_ldm, tmp_path / "webui"):
        outputs = page_load_outputs(ui.build(JobRunner(), A1111Host()))
    import gradio as gr

    assert all(value == gr.update() for value in outputs.values()), outputs
