"""A1111Host against the stand-in WebUI (tests/webui_standin): the merged LoRA undone before training, the
queue lock and progress state around a job, the WebUI's RNG left alone, refusals, folders, generation through
the WebUI's pipeline, and the check of a saved LoRA with the built-in Lora loader."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_train.cli_demo import make_sample_dataset
from lora_train.config import config_from_dict
from lora_train.models import TargetSpec
from lora_train.models.ldm import LdmModel
from lora_train.pipeline import train_lora
from lora_train.webui.a1111 import A1111Host
from lora_train.webui.host import HostError
from webui_standin import LORA_MODULES, installed, load_tiny_ldm, queue_lock_held, train_values

PROMPT = "a red circle"
TASK_ID = "task(lora-train-host-test)"
# Stems the built-in loader cannot place on an SD1 model: a fourth down level, a third text-encoder layer.
BOGUS_STEMS = ("lora_te_text_model_encoder_layers_7_self_attn_q_proj", "lora_unet_down_blocks_9_attentions_0_proj_in")
# kohya stem -> the layer name A1111's networks.py documents for it (SD1 unless marked).
CONVERSIONS = [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", False, "diffusion_model_input_blocks_1_1_proj_in"),
    ("lora_unet_down_blocks_1_resnets_1_conv2", False, "diffusion_model_input_blocks_5_0_out_layers_3"),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", False, "diffusion_model_input_blocks_9_0_op"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", False,
     "diffusion_model_middle_block_1_transformer_blocks_0_attn1_to_q"),
    ("lora_unet_mid_block_resnets_1_time_emb_proj", False, "diffusion_model_middle_block_2_emb_layers_1"),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", False, "diffusion_model_output_blocks_11_1_proj_out"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", False, "diffusion_model_output_blocks_2_1_conv"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", False, "diffusion_model_output_blocks_5_2_conv"),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", False,
     "transformer_text_model_encoder_layers_0_self_attn_q_proj"),
    ("lora_te_text_model_encoder_layers_3_mlp_fc1", True, "model_transformer_resblocks_3_mlp_c_fc"),
]


@pytest.fixture
def webui(tiny_ldm, tmp_path):
    """The stand-in WebUI holding the tiny checkpoint; yields modules.shared."""
    with installed(tiny_ldm, tmp_path / "webui") as shared:
        yield shared


@pytest.fixture(scope="module")
def trained_lora(tiny_checkpoint, tmp_path_factory) -> Path:
    """A LoRA trained for one step on the tiny ldm model: attention, LoCon convs and the text encoder."""
    folder = tmp_path_factory.mktemp("trained")
    values = train_values(make_sample_dataset(folder / "images"), "trained", steps=1, output_dir=str(folder))
    values["model"].update(conv_rank=2, conv_alpha=2.0)
    values["training"]["learning_rate"] = 1e-2
    config = config_from_dict(values).validate(require_base_model=False)
    return train_lora(config, LdmModel(load_tiny_ldm(tiny_checkpoint), name="tiny-sd1")).lora_path


def stems(path: Path):
    return sorted({key.split(".", 1)[0] for key in load_file(str(path))})


def changed_tensors(model: torch.nn.Module, reference: dict):
    return [key for key, value in model.state_dict().items() if not torch.equal(value, reference[key])]


def standin_modules():
    return [name for name in sys.modules if name.split(".")[0] == "modules" or name in LORA_MODULES]


def test_the_stand_in_is_gone_after_its_block(tmp_path):
    path, args = list(sys.path), os.environ.get("COMMANDLINE_ARGS")
    with installed(None, tmp_path) as shared:
        import networks

        assert shared.sd_model is None and networks.loaded_networks == []
        assert standin_modules()
    assert standin_modules() == []
    assert sys.path == path and os.environ.get("COMMANDLINE_ARGS") == args


@pytest.mark.parametrize("stem, is_sd2, layer", CONVERSIONS)
def test_stand_in_converts_stems_as_the_builtin_documents(tmp_path, stem, is_sd2, layer):
    with installed(None, tmp_path):
        import networks

        assert networks.convert_diffusers_name_to_compvis(stem, is_sd2) == layer


def test_every_adapter_stem_names_the_layer_it_adapts_for_the_builtin_loader(webui):
    import networks

    mapping = webui.sd_model.network_layer_mapping
    targets = LdmModel(webui.sd_model).lora_targets(TargetSpec(text_encoder=True, conv=True))
    assert len(targets) > 100
    misplaced = [stem for stem, layer in targets.items()
                 if mapping.get(networks.convert_diffusers_name_to_compvis(stem, False)) is not layer]
    assert misplaced == []


def test_training_model_undoes_the_lora_the_builtin_left_merged(webui, tiny_checkpoint, trained_lora):
    import network
    import networks

    checkpoint = load_file(str(tiny_checkpoint))
    net = networks.load_network("trained", network.NetworkOnDisk("trained", str(trained_lora)))
    networks.loaded_networks.append(net)  # a <lora:trained:1> generation ran last
    for module in webui.sd_model.modules():
        networks.network_apply_weights(module)
    merged = changed_tensors(webui.sd_model, checkpoint)
    assert any(k.startswith("model.diffusion_model.") for k in merged)
    assert any(k.startswith("cond_stage_model.") for k in merged)

    model = A1111Host().training_model()

    assert model.sd_model is webui.sd_model and model.name == "tiny-sd1"
    assert changed_tensors(webui.sd_model, checkpoint) == []
    assert networks.loaded_networks == [], "left in, the built-in would merge the LoRA again at the next forward"
    assert all(getattr(m, "network_weights_backup", None) is None for m in webui.sd_model.modules())


def test_without_the_builtin_lora_extension_training_still_starts_and_verification_says_why(
        webui, trained_lora, monkeypatch):
    monkeypatch.delitem(sys.modules, "networks")
    host = A1111Host()
    assert host.training_model().sd_model is webui.sd_model
    with pytest.raises(HostError, match="built-in Lora extension is not loaded"):
        host.verify_lora(trained_lora)


def test_exclusive_holds_the_queue_lock_and_brackets_the_progress_state(webui):
    from modules import progress

    state, host = webui.state, A1111Host()
    state.interrupted = True  # an Interrupt pressed during an earlier generation
    with host.exclusive("lora_train", TASK_ID):
        assert queue_lock_held()
        assert state.job == "lora_train" and not state.interrupted
        assert progress.current_task == TASK_ID and TASK_ID not in progress.pending_tasks
    assert not queue_lock_held()
    assert state.job == "" and state.job_count == 0
    assert progress.current_task is None and TASK_ID in progress.finished_tasks

    with pytest.raises(RuntimeError, match="boom"), host.exclusive("lora_train"):
        raise RuntimeError("boom")
    assert not queue_lock_held() and state.job == ""


def test_exclusive_leaves_the_webuis_rng_state_as_it_was(webui, trained_lora):
    host = A1111Host()
    torch.manual_seed(1)
    before = torch.get_rng_state()
    host.generate(PROMPT, seed=5, steps=2, width=64, height=64)
    assert not torch.equal(torch.get_rng_state(), before), "the WebUI's sampler draws from the global RNG"

    torch.manual_seed(1)
    with host.exclusive("lora_train"):
        host.generate(PROMPT, seed=5, steps=2, width=64, height=64)
        host.verify_lora(trained_lora)  # the built-in loader's layer init draws too
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)


def test_generate_uses_the_webuis_pipeline_and_keeps_the_jobs_progress(webui):
    from modules import processing

    state, host = webui.state, A1111Host()
    with host.exclusive("lora_train"):
        host.report(3, 10, "step 3/10")
        shown = {name: getattr(state, name) for name in ("job", "job_count", "job_no", "textinfo")}
        image = host.generate(PROMPT, seed=7, steps=3, width=64, height=128)
        assert {name: getattr(state, name) for name in shown} == shown
        again = host.generate(PROMPT, seed=7, steps=3, width=64, height=128)
        other = host.generate(PROMPT, seed=8, steps=3, width=64, height=128)
    assert image.size == (64, 128)
    assert image.tobytes() == again.tobytes() and image.tobytes() != other.tobytes()

    assert processing.StableDiffusionProcessing.cached_c[0] is not None  # persistent cond cache is on
    host.clear_cond_cache()
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    assert processing.StableDiffusionProcessing.cached_uc == [None, None]


@pytest.mark.parametrize("args, change, message", [
    (["--lowvram"], None, "--lowvram"),
    ([], "inpaint", "inpainting or depth model .* 9 input channels"),
    ([], "sd3", r"\(SD3\) is not a model this extension trains; it trains SD 1.x, SD 2.x and SDXL"),
    ([], "unload", "no checkpoint is loaded"),
])
def test_check_trainable_refuses_what_cannot_train(tiny_ldm, tmp_path, args, change, message):
    with installed(tiny_ldm, tmp_path, args) as shared:
        if change == "inpaint":
            shared.sd_model.model.diffusion_model.in_channels = 9
        elif change == "sd3":
            shared.sd_model = torch.nn.Linear(1, 1)
            shared.sd_model.is_sd3 = True
        elif change == "unload":
            shared.sd_model = None
        with pytest.raises(HostError, match=message):
            A1111Host().check_trainable()
        with pytest.raises(HostError, match=message):
            A1111Host().training_model()


def test_medvram_trains(tiny_ldm, tmp_path):
    with installed(tiny_ldm, tmp_path, ["--medvram"]):
        A1111Host().check_trainable()


def test_folders_follow_the_webuis_command_line(tiny_ldm, tmp_path):
    data = tmp_path / "data"
    with installed(tiny_ldm, data):
        host = A1111Host()
        assert host.lora_dir() == data / "models" / "Lora"
        assert host.work_dir("mine") == data / "outputs" / "lora-train" / "mine"
        assert host.presets_dir() == data / "lora-train-presets"
    with installed(tiny_ldm, data, ["--lora-dir", str(tmp_path / "loras"),
                                    "--lora-train-work-dir", str(tmp_path / "work")]):
        assert A1111Host().lora_dir() == tmp_path / "loras"
        assert A1111Host().work_dir("mine") == tmp_path / "work" / "mine"


def test_verify_lora_places_every_layer_of_a_lora_trained_on_the_loaded_model(webui, trained_lora):
    verification = A1111Host().verify_lora(trained_lora)
    assert verification.unmatched == []
    assert verification.matched == verification.stems == len(stems(trained_lora)) > 100
    assert verification.ok


def test_verify_lora_names_the_stems_it_cannot_place(webui, trained_lora, tmp_path):
    tensors = load_file(str(trained_lora))
    donor = next(stem for stem in stems(trained_lora) if stem.endswith("_self_attn_q_proj"))
    for stem in BOGUS_STEMS:
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            tensors[f"{stem}.{part}"] = tensors[f"{donor}.{part}"].clone()
    bogus = tmp_path / "bogus.safetensors"
    save_file(tensors, str(bogus))

    verification = A1111Host().verify_lora(bogus)
    assert verification.unmatched == sorted(BOGUS_STEMS)
    assert verification.matched == len(stems(trained_lora)) and verification.stems == verification.matched + 2
    assert not verification.ok
