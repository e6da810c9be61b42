"""SDXL in the stand-in WebUI (tests/webui_standin holding the tiny SDXL): the host trains it, the built-in Lora
loader places every stem of a LoRA made for it on the layer it was trained on, verification counts a fused
attention's stems as the built-in applies them, a LoRA the built-in left merged is undone, and a train job
lands the file and gives the model back exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_train.fused_attention import FusedProjection
from lora_train.jobs import JobRunner
from lora_train.models import TargetSpec
from lora_train.models.sgm import SgmModel
from lora_train.network import NetworkSpec, create_network
from lora_train.webui.a1111 import A1111Host
from lora_train.webui.host import HostError
from lora_train.webui.tasks import PreviewOptions, train_job
from host_state import assert_same_model, snapshot
from webui_standin import ProbeHost, installed, train_values

NAME = "sdxl_lora"
JOB_TIMEOUT_S = 180
TE2_LAYER = "lora_te2_text_model_encoder_layers_0"
# kohya SDXL stem -> the name A1111 1.10.1's convert_diffusers_name_to_compvis gives it
CONVERSIONS = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    (f"{TE2_LAYER}_self_attn_q_proj", "1_model_transformer_resblocks_0_attn_q_proj"),
    (f"{TE2_LAYER}_self_attn_out_proj", "1_model_transformer_resblocks_0_attn_out_proj"),
    (f"{TE2_LAYER}_mlp_fc1", "1_model_transformer_resblocks_0_mlp_c_fc"),
    (f"{TE2_LAYER}_mlp_fc2", "1_model_transformer_resblocks_0_mlp_c_proj"),
]


@pytest.fixture
def webui(tiny_sdxl, tmp_path):
    with installed(tiny_sdxl, tmp_path / "webui") as shared:
        yield shared


def save_network(targets, path: Path, seed: int = 0) -> Path:
    """The adapters' file with non-zero up weights (a fresh network's are zero, and would change nothing)."""
    network = create_network(targets, NetworkSpec(rank=2, alpha=2, seed=seed))
    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.lora_up.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(seed))
    save_file(network.state_dict(), str(path))
    return path


def builtin_layer(target):
    """The layer the built-in files a target's stem under: a fused projection's attention, out_proj for its out."""
    if isinstance(target, FusedProjection):
        return target.attention.out_proj if target.part == "out" else target.attention
    return target


def model_targets(text_encoder: bool = True):
    return A1111Host().training_model().lora_targets(TargetSpec(text_encoder=text_encoder))


def te2_stems(*names: str):
    """Stems in the first OpenCLIP layer, with that layer's Linear weights: placed by name, not trained here."""
    resblock = A1111Host().sd_model().conditioner.embedders[1].wrapped.model.transformer.resblocks[0]
    layers = {"self_attn_out_proj": resblock.attn.out_proj, "mlp_fc1": resblock.mlp.c_fc,
              "mlp_fc2": resblock.mlp.c_proj}
    width = resblock.attn.embed_dim
    return {f"{TE2_LAYER}_{name}": layers.get(name, torch.nn.Linear(width, width)) for name in names}


@pytest.mark.parametrize("stem, layer", CONVERSIONS)
def test_stand_in_converts_sdxl_stems_as_the_builtin_does(tmp_path, stem, layer):
    with installed(None, tmp_path):
        import networks

        assert networks.convert_diffusers_name_to_compvis(stem, False) == layer


def test_the_host_trains_the_sdxl_it_holds(webui):
    host = A1111Host()
    host.check_trainable()
    model = host.training_model()
    assert isinstance(model, SgmModel) and model.sd_model is webui.sd_model and model.name == "tiny-sdxl"


def test_the_builtin_places_every_stem_on_the_layer_it_was_trained_on(webui, tmp_path):
    import network
    import networks

    targets = model_targets()
    path = save_network(targets, tmp_path / "placed.safetensors")
    loaded = networks.load_network("placed", network.NetworkOnDisk("placed", str(path)))
    placed = {module.network_key.split(".")[0]: module.sd_module for module in loaded.modules.values()}
    assert placed.keys() == targets.keys()
    assert [stem for stem, target in targets.items() if placed[stem] is not builtin_layer(target)] == []
    assert {key[:2] for key in loaded.modules if not key.startswith("diffusion_model_")} == {"0_", "1_"}
    verification = A1111Host().verify_lora(path)
    assert verification.ok and verification.matched == verification.stems == len(targets)


@pytest.mark.parametrize("parts, unmatched", [
    (("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1"), []),
    (("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "mlp_fc1"),
     ["self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj"]),
    (("self_attn_q_proj", "self_attn_out_proj", "mlp_fc2"), ["self_attn_out_proj", "self_attn_q_proj"]),
])
def test_verification_counts_a_fused_attention_only_with_all_four_stems(webui, tmp_path, parts, unmatched):
    path = save_network(te2_stems(*parts), tmp_path / "te2.safetensors")
    verification = A1111Host().verify_lora(path)
    assert verification.unmatched == [f"{TE2_LAYER}_{part}" for part in unmatched]
    assert verification.matched == verification.stems == len(parts), "the built-in files each stem somewhere"


def test_training_model_undoes_the_lora_the_builtin_left_merged(webui, tmp_path):
    import network
    import networks

    original = {key: value.clone() for key, value in webui.sd_model.state_dict().items()}
    path = save_network(model_targets(), tmp_path / "merged.safetensors", seed=3)
    networks.loaded_networks.append(networks.load_network("merged", network.NetworkOnDisk("merged", str(path))))
    # a <lora:merged:1> generation ran last: the patched forwards merged it (an attention's forward never calls
    # its out_proj's, so out_proj is merged through the attention only)
    out_projs = {id(m.out_proj) for m in webui.sd_model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    for module in webui.sd_model.modules():
        if id(module) not in out_projs:
            networks.network_apply_weights(module)
    state = webui.sd_model.state_dict()
    merged = [key for key, value in state.items() if not torch.equal(value, original[key])]
    parts = (".diffusion_model.", ".embedders.0.", ".embedders.1.")
    assert [part for part in parts if any(part in key for key in merged)] == list(parts)

    A1111Host().training_model()

    state = webui.sd_model.state_dict()
    assert [key for key, value in state.items() if not torch.equal(value, original[key])] == []
    assert networks.loaded_networks == []


def test_an_sdxl_refiner_is_refused_with_what_to_load(webui):
    webui.sd_model.conditioner.embedders[2].input_key = "aesthetic_score"
    with pytest.raises(HostError, match="SDXL refiner.*load an SDXL base model"):
        A1111Host().check_trainable()


def test_a_train_job_lands_the_sdxl_lora_and_gives_the_model_back(webui, sample_images):
    before = snapshot(webui.sd_model)
    values = train_values(sample_images, NAME, steps=2)
    values["model"]["train_text_encoder"] = True
    job = JobRunner().start("train", train_job(values, ProbeHost(), PreviewOptions(every_n_steps=2, steps=2)))
    assert job.done.wait(JOB_TIMEOUT_S), "the job did not finish"
    status = job.snapshot()

    assert status["state"] == "done", status["error"]
    verification = status["report"]["verification"]
    assert verification["unmatched"] == [] and verification["matched"] == verification["stems"]
    with safe_open(status["output"], "pt") as file:
        metadata, stems = file.metadata(), {key.split(".")[0] for key in file.keys()}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_sd_model_name"] == "tiny-sdxl"
    assert {stem.split("_")[1] for stem in stems} == {"unet", "te1", "te2"}
    assert [Path(p).name for p in status["report"]["previews"]] == ["step-000000.png", "step-000002.png"]
    assert_same_model(webui.sd_model, before)
