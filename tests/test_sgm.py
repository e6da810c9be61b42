"""SDXL as the WebUI holds it (sgm DiffusionEngine), on the tiny SDXL in the stand-in WebUI: targets and their
stems, the size/crop conditioning against the WebUI's own, the loss against a reference, gradients reaching
the text encoder through sgm's conditioner, the model given back exactly, and the models that are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from lora_train.dataset import load_dataset
from lora_train.models import HeldModel, ModelLoadError, SizeInfo, TargetSpec
from lora_train.models.adapters import adapt
from lora_train.models.sgm import SgmModel
from lora_train.network import create_network, NetworkSpec
from lora_train.pipeline import train_lora
from lora_train.trainer import Trainer
from host_state import assert_same_model, snapshot
from test_training import make_config
from webui_standin import installed

CAPTION = "demo style, a red circle"
UNET_TARGETS = 11 * 12  # 11 transformers (input 4, 5, 7, 8, middle, output 0-5) x proj_in/out, 2 x 4 attn, 2 ff
TE1_LAYER_TARGETS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                     "mlp_fc2")
TE1_TARGETS = 2 * len(TE1_LAYER_TARGETS)  # 2 CLIP layers
TE2_TARGETS = 3 * 6  # 3 OpenCLIP layers x q, k, v, out (of the fused attention), fc1, fc2


@pytest.fixture
def webui(tiny_sdxl, tmp_path):
    """The stand-in WebUI holding the tiny SDXL; yields modules.shared."""
    with installed(tiny_sdxl, tmp_path / "webui") as shared:
        yield shared


def sgm_model(shared) -> SgmModel:
    return adapt(shared.sd_model, HeldModel(name="tiny-sdxl"))


def webui_conditioning(shared, caption: str, side: int):
    from modules import prompt_parser

    return shared.sd_model.get_learned_conditioning(prompt_parser.SdConditioning([caption], width=side, height=side))


def test_the_webuis_sdxl_is_adapted_by_sgm_with_kohya_sdxl_stems(webui):
    model = sgm_model(webui)
    assert isinstance(model, SgmModel) and (model.family, model.prediction) == ("sdxl", "epsilon")
    assert model.size_conditioned and torch.equal(model.alphas_cumprod, webui.sd_model.alphas_cumprod)
    targets = model.lora_targets(TargetSpec(text_encoder=True))
    parts = {part: {stem: target for stem, target in targets.items() if stem.startswith(f"lora_{part}_")}
             for part in ("unet", "te1", "te2")}
    assert {part: len(found) for part, found in parts.items()} == {
        "unet": UNET_TARGETS, "te1": TE1_TARGETS, "te2": TE2_TARGETS}
    assert len(targets) == UNET_TARGETS + TE1_TARGETS + TE2_TARGETS
    sd_unet, embedders = webui.sd_model.model.diffusion_model, webui.sd_model.conditioner.embedders
    assert parts["unet"]["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] is \
        sd_unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q
    assert parts["te1"]["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] is \
        embedders[0].wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj
    resblock = embedders[1].wrapped.model.transformer.resblocks[2]
    assert parts["te2"]["lora_te2_text_model_encoder_layers_2_mlp_fc1"] is resblock.mlp.c_fc
    assert parts["te2"]["lora_te2_text_model_encoder_layers_2_self_attn_k_proj"].attention is resblock.attn
    assert len(model.lora_targets(TargetSpec(text_encoder=False))) == UNET_TARGETS


def test_a_bare_sgm_model_without_the_hijacks_wrappers_is_adapted_too(tiny_sdxl):
    tiny_sdxl.alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
    model = adapt(tiny_sdxl, HeldModel())
    targets = model.lora_targets(TargetSpec(text_encoder=True))
    assert targets["lora_te1_text_model_encoder_layers_1_mlp_fc2"] is \
        tiny_sdxl.conditioner.embedders[0].transformer.text_model.encoder.layers[1].mlp.fc2


def test_size_conditioning_equals_the_webuis_for_an_uncropped_sample_and_follows_the_crop(webui):
    model = sgm_model(webui)
    with torch.no_grad():
        ours = model.encode_prompts([CAPTION], [SizeInfo.square(64)])
        theirs = webui_conditioning(webui, CAPTION, 64)
        cropped = model.encode_prompts([CAPTION], [SizeInfo((96, 64), (16, 0), (64, 64))])
    assert torch.equal(ours.crossattn, theirs["crossattn"]) and torch.equal(ours.vector, theirs["vector"])
    assert torch.equal(cropped.crossattn, ours.crossattn)
    assert not torch.equal(cropped.vector, ours.vector)
    text = ours.vector.shape[1] - 3 * 2 * 256  # the pooled text embedding comes first, then 3 size/crop pairs
    assert torch.equal(cropped.vector[:, :text], ours.vector[:, :text])


@pytest.mark.parametrize("parameterization, prediction", [("eps", "epsilon"), ("v", "v_prediction")])
def test_the_loss_equals_a_reference_computation(webui, sample_images, tmp_path, parameterization, prediction):
    webui.sd_model.parameterization = parameterization  # A1111 sets "v" for a config with VScaling
    model = sgm_model(webui)
    assert model.prediction == prediction
    config = make_config(sample_images, "", tmp_path / "out")
    network = create_network(model.lora_targets(TargetSpec(text_encoder=False)), NetworkSpec(rank=4, alpha=4))
    trainer = Trainer(model, network, load_dataset(config.data), config, torch.device("cpu"))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = model.encode_prompts([CAPTION, "a blue square"], [SizeInfo.square(64)] * 2)
        loss = trainer._loss(latents, cond, torch.Generator().manual_seed(5))

        generator = torch.Generator().manual_seed(5)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (2,), generator=generator)
        a = webui.sd_model.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        output = webui.sd_model.apply_model(noisy, timesteps, {"crossattn": cond.crossattn, "vector": cond.vector})
        target = noise if parameterization == "eps" else a.sqrt() * noise - (1 - a).sqrt() * latents
    torch.testing.assert_close(loss, F.mse_loss(output, target))


def test_gradients_reach_both_text_encoders_adapters_only_while_training_them(webui):
    model = sgm_model(webui)
    embedders = webui.sd_model.conditioner.embedders
    network = create_network(model.lora_targets(TargetSpec(text_encoder=True)), NetworkSpec(rank=4, alpha=4))
    handle = network.attach()
    try:
        with model.training(gradient_checkpointing=False, text_encoder=False):
            cond = model.encode_prompts([CAPTION], [SizeInfo.square(64)])
            assert cond.crossattn.grad_fn is None and cond.vector.grad_fn is None
        with model.training(gradient_checkpointing=False, text_encoder=True):
            assert [e.is_trainable for e in embedders[:2]] == [True, True]
            cond = model.encode_prompts([CAPTION], [SizeInfo.square(64)])
            model.predict(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond).square().mean().backward()
    finally:
        handle.detach()
    assert [e.is_trainable for e in embedders] == [False] * len(embedders), "the flags are back"
    stems = ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_2_mlp_fc2",
             "lora_te2_text_model_encoder_layers_0_self_attn_q_proj")
    for stem in stems:
        up = network.adapters[stem].lora_up.weight
        assert up.grad is not None and up.grad.abs().sum() > 0, stem


def test_training_gives_the_model_back_bit_identical(webui, sample_images, tmp_path):
    sd_model = webui.sd_model
    sd_unet = sd_model.model.diffusion_model
    sd_unet.input_blocks[1][0].use_checkpoint = True  # sgm's own (reentrant) checkpointing, switched on
    sd_unet.output_blocks[0][1].transformer_blocks[0].checkpoint = True
    before = snapshot(sd_model)
    trainable = [e.is_trainable for e in sd_model.conditioner.embedders]
    config = make_config(sample_images, "", tmp_path / "out", max_train_steps=3, gradient_checkpointing=True)
    config.model.train_text_encoder = True

    result = train_lora(config, sgm_model(webui))

    assert_same_model(sd_model, before)
    assert [e.is_trainable for e in sd_model.conditioner.embedders] == trainable
    tensors = load_file(str(result.lora_path))
    # TE1's conditioning is its penultimate hidden state: its last layer's adapters get no gradient, as in kohya
    unused = {f"lora_te1_text_model_encoder_layers_1_{layer}" for layer in TE1_LAYER_TARGETS}
    learned = {key.split(".")[0] for key, value in tensors.items() if key.endswith("lora_up.weight") and value.any()}
    assert learned == {key.split(".")[0] for key in tensors} - unused
    assert any(stem.startswith("lora_te2_") for stem in learned)
    with safe_open(str(result.lora_path), "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


@pytest.mark.parametrize("change, message", [
    ("refiner", "an SDXL refiner, which LoRAs are not trained on; load an SDXL base model"),
    ("inpaint", "an SDXL inpainting model .*9 input channels.*load the SDXL base"),
    ("one text encoder", "does not have SDXL's two text encoders"),
])
def test_models_that_cannot_train_are_refused_with_what_to_load(webui, change, message):
    sd_model = webui.sd_model
    if change == "refiner":
        sd_model.conditioner.embedders[2].input_key = "aesthetic_score"
    elif change == "inpaint":
        sd_model.model.diffusion_model.in_channels = 9
    else:
        del sd_model.conditioner.embedders[0].wrapped.transformer
    with pytest.raises(ModelLoadError, match=message):
        adapt(sd_model, HeldModel())


def test_ldm_models_are_not_sgms(tiny_ldm):
    assert SgmModel.adapt(tiny_ldm, HeldModel()) is None
