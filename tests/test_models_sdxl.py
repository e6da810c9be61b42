"""Standalone SDXL: the original-layout single file and a diffusers folder load offline, condition as sgm does,
train from the CLI, and give files diffusers' SDXL pipeline loads with our image; other models are refused.

The tiny file's sgm `.yaml` lies beside it, as the WebUI reads one: it names what weights cannot tell (16-channel
attention heads, a local CLIP config folder and an open_clip arch for the text encoders' heads, VScaling for v).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from safetensors import safe_open

from lora_train.cli import main
from lora_train.config import DataConfig, TrainConfig
from lora_train.models import ModelLoadError, SizeInfo, TargetSpec
from lora_train.models.detect import detect_family
from lora_train.models.diffusers import load_diffusers_model
from lora_train.pipeline import train_lora
from lora_train.tiny_sdxl import UNET_CONFIG, build_tiny_sdxl, build_tiny_sdxl_checkpoint

TE2_ARCH = "ViT-tiny-sdxl-te2-test"
CAPTIONS = ["demo style, a red circle", "a blue square on a long caption " * 12]
SIZES = [SizeInfo((512, 768), (0, 32), (64, 64)), SizeInfo((1024, 1024), (16, 0), (128, 64))]
# tiny: 2 levels with attention, 1 transformer block each, 2 (down) / 3 (up) per level, 1 in the middle;
# 10 targets per block (attn1/attn2 q/k/v/out, ff in/out) + proj_in/out per transformer
TINY_UNET_TARGETS = (2 * 2 + 2 * 3 + 1) * (10 + 2)
TINY_TE_TARGETS = 6 * 2 + 6 * 3  # CLIP: 2 layers, OpenCLIP: 3 layers


def sgm_yaml(folder, v_prediction: bool) -> dict:
    """The tiny model's sgm config (as tiny-sdxl.yaml.in of the WebUI harness, with what standalone reads)."""
    import open_clip

    from lora_train.tiny_sdxl import TE2_EMBED, TE2_WIDTH

    model = build_tiny_sdxl()
    clip_folder = folder / "clip-config"
    model.conditioner.embedders[0].transformer.config.save_pretrained(clip_folder)
    arch = {"embed_dim": TE2_EMBED, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TE2_WIDTH, "heads": 2, "layers": 3}}
    (folder / f"{TE2_ARCH}.json").write_text(json.dumps(arch))
    open_clip.add_model_config(folder / f"{TE2_ARCH}.json")
    scaling = "VScaling" if v_prediction else "EpsScaling"
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025,
        "denoiser_config": {"params": {"num_idx": 1000, "scaling_config": {
            "target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"}}},
        "network_config": {"params": {"num_head_channels": UNET_CONFIG["num_head_channels"]}},
        "conditioner_config": {"params": {"emb_models": [
            {"params": {"version": str(clip_folder), "layer": "hidden", "layer_idx": -2}},
            {"params": {"arch": TE2_ARCH, "layer": "penultimate", "always_return_pooled": True}}]}}}}}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """tiny-sdxl.safetensors (eps) with its sgm .yaml beside it."""
    folder = tmp_path_factory.mktemp("sdxl")
    path = build_tiny_sdxl_checkpoint(folder)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(sgm_yaml(folder, v_prediction=False)))
    return path


@pytest.fixture(scope="module")
def model(tiny_sdxl):
    return load_diffusers_model(str(tiny_sdxl))


def test_tiny_sdxl_file_loads_sized_from_its_weights(model):
    assert (model.family, model.prediction, model.size_conditioned) == ("sdxl", "epsilon", True)
    assert model.unet.config.addition_embed_type == "text_time"
    assert model.unet.config.attention_head_dim == (2, 4, 8)  # 32/64/128 channels in 16-channel heads
    assert model.text_encoder_2.config.num_attention_heads == 2 and model.text_encoder_2.config.num_hidden_layers == 3
    assert model.vae.config.scaling_factor == pytest.approx(0.13025)
    assert model.tokenizer_2.pad_token == "!" and model.tokenizer.pad_token == "<|endoftext|>"
    torch.testing.assert_close(model.alphas_cumprod[[0, -1]], torch.tensor([0.99915, 0.00466]), atol=1e-5, rtol=0)


def test_without_a_yaml_the_bundled_sdxl_defaults_apply_only_where_the_weights_fit(tmp_path):
    model = load_diffusers_model(str(build_tiny_sdxl_checkpoint(tmp_path)))  # no .yaml beside it
    assert model.unet.config.attention_head_dim == (1, 1, 2)  # 64-channel heads
    assert model.text_encoder_2.config.num_attention_heads == 1  # bigG's 20 heads do not fit a 64-wide tower
    assert model.prediction == "epsilon"
    with torch.no_grad():
        assert model.encode_prompts(CAPTIONS, SIZES).isfinite()


@pytest.mark.parametrize("marker", ["key", "yaml"])
def test_v_prediction_is_read_from_the_key_or_the_yaml(tmp_path, tiny_sdxl, marker):
    path = build_tiny_sdxl_checkpoint(tmp_path, v_prediction=marker == "key")
    path.with_suffix(".yaml").write_text(yaml.safe_dump(sgm_yaml(tmp_path, v_prediction=marker == "yaml")))
    assert load_diffusers_model(str(path)).prediction == "v_prediction"


def test_conditioning_and_unet_output_match_the_sgm_model(model):
    reference = build_tiny_sdxl()  # the checkpoint's weights (same seed)
    batch = {"txt": CAPTIONS, **{key: torch.tensor([getattr(size, field) for size in SIZES], dtype=torch.float32)
                                 for key, field in (("original_size_as_tuple", "original"),
                                                    ("crop_coords_top_left", "crop_top_left"),
                                                    ("target_size_as_tuple", "target"))}}
    with torch.no_grad():
        theirs = reference.conditioner(batch)
        ours = model.encode_prompts(CAPTIONS, SIZES)
        pooled = model.text_encoder_2.config.projection_dim
        torch.testing.assert_close(ours.crossattn, theirs["crossattn"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.vector[:, :pooled], theirs["vector"][:, :pooled], rtol=1e-4, atol=1e-4)
        noisy, timesteps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 700])
        expected = reference.model(noisy, timesteps, theirs)
        torch.testing.assert_close(model.predict(noisy, timesteps, ours), expected, rtol=1e-4, atol=1e-4)


def test_targets_use_kohya_sdxl_names_and_each_names_an_sgm_module(model):
    targets = model.lora_targets(TargetSpec(conv=True))
    attention = model.lora_targets(TargetSpec())
    assert sum(s.startswith("lora_unet_") for s in attention) == TINY_UNET_TARGETS
    assert sum(s.startswith(("lora_te1_", "lora_te2_")) for s in attention) == TINY_TE_TARGETS
    for stem in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_in",
                 "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_2_mlp_fc1"):
        assert stem in attention, stem
    sgm = {name.replace(".", "_"): module for name, module in build_tiny_sdxl().model.diffusion_model.named_modules()}
    for stem, module in targets.items():
        if stem.startswith("lora_unet_"):
            assert sgm[stem[len("lora_unet_"):]].weight.shape == module.weight.shape, stem


def test_real_sdxl_unet_has_kohyas_722_targets():
    from diffusers import UNet2DConditionModel

    from lora_train.bench_models import SDXL_UNET
    from lora_train.models.common import empty_module
    from lora_train.targets import UNET_ATTENTION_BLOCKS, UNET_PREFIX, find_targets, sdxl_diffusers_to_compvis_path

    unet = empty_module(UNet2DConditionModel, **SDXL_UNET)
    assert len(find_targets(unet, UNET_ATTENTION_BLOCKS, UNET_PREFIX, sdxl_diffusers_to_compvis_path)) == 722


def fake_state(*keys: str, input_channels: int = 4):
    state = {key: torch.zeros(1) for key in keys}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, input_channels, 3, 3)
    return state


@pytest.mark.parametrize("keys, channels, message", [
    (["conditioner.embedders.0.model.token_embedding.weight"], 4, "is an SDXL refiner"),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], 4, "is an SD3 checkpoint"),
    (["double_blocks.0.img_attn.qkv.weight"], 4, "is a Flux checkpoint"),
    (["conditioner.embedders.0.transformer.text_model.x", "conditioner.embedders.1.model.x"], 9,
     "is an SDXL inpainting model"),
    (["cond_stage_model.transformer.text_model.x"], 9, "is an SD 1.x inpainting model"),
    (["cond_stage_model.model.x"], 9, "is an SD 2.x inpainting model"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], 4, "is not a Stable Diffusion base model"),
])
def test_unsupported_checkpoints_are_refused_by_name(keys, channels, message):
    with pytest.raises(ModelLoadError, match=message) as error:
        detect_family(fake_state(*keys, input_channels=channels), "x.safetensors")
    assert str(error.value).startswith("x.safetensors ") and "SDXL" in str(error.value).split("this trains")[1]


def test_supported_families_are_told_apart():
    assert detect_family(fake_state("conditioner.embedders.0.transformer.text_model.x",
                                    "conditioner.embedders.1.model.x"), "x") == "sdxl"
    assert detect_family(fake_state("cond_stage_model.model.x"), "x") == "sd2"
    assert detect_family(fake_state("cond_stage_model.transformer.text_model.x"), "x") == "sd1"


def make_config(images, base, out, **training) -> TrainConfig:
    config = TrainConfig(data=DataConfig(train_data_dir=str(images), resolution=64, min_bucket_reso=64,
                                         max_bucket_reso=128))
    config.model.base_model, config.model.lora_rank, config.model.alpha = str(base), 4, 4.0
    for key, value in {**dict(batch_size=4, learning_rate=3e-3, max_train_steps=2), **training}.items():
        setattr(config.training, key, value)
    config.output.output_dir, config.output.output_name = str(out), "sdxl_lora"
    return config.validate()


def test_cli_trains_the_tiny_sdxl_file(tiny_sdxl, sample_images, tmp_path, capsys):
    config = make_config(sample_images, tiny_sdxl, tmp_path / "out", gradient_checkpointing=True)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    assert main(["train", "--config", str(run_yaml)]) == 0
    printed = capsys.readouterr().out
    assert "training done: 2/2 steps" in printed
    assert math.isfinite(float(re.search(r"final loss (\S+)", printed).group(1)))
    with safe_open(str(tmp_path / "out" / "sdxl_lora.safetensors"), "pt") as file:
        metadata, keys = file.metadata(), list(file.keys())
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert any(key.startswith("lora_te2_") for key in keys) and any(key.startswith("lora_unet_input_") for key in keys)


def test_diffusers_folder_loads_and_trains_one_step(model, sample_images, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                     text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
                                     tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "tiny-sdxl-diffusers")
    loaded = load_diffusers_model(str(tmp_path / "tiny-sdxl-diffusers"))
    assert (loaded.family, loaded.prediction) == ("sdxl", "epsilon")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_prompts(CAPTIONS, SIZES).vector,
                                   model.encode_prompts(CAPTIONS, SIZES).vector)
    result = train_lora(make_config(sample_images, tmp_path / "tiny-sdxl-diffusers", tmp_path / "out",
                                    max_train_steps=1), loaded)
    assert result.steps == 1 and all(torch.isfinite(torch.tensor(result.losses)))


def generate(model, lora_path=None, network=None):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                     text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
                                     tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    if lora_path is not None:
        pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    handle = network.attach() if network is not None else None
    image = pipe(CAPTIONS[0], height=64, width=64, num_inference_steps=2, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    if handle is not None:
        handle.detach()
    return torch.from_numpy(image)


def test_diffusers_sdxl_pipeline_loads_the_file_and_reproduces_our_image(tiny_sdxl, sample_images, tmp_path):
    from test_export import export, trained_looking_network

    from lora_train.dataset import load_dataset

    fresh = load_diffusers_model(str(tiny_sdxl))  # the pipeline's loader changes the modules it loads into
    config = make_config(sample_images, tiny_sdxl, tmp_path / "out")
    network = trained_looking_network(config, fresh)
    assert {stem.split("_")[1] for stem in network.adapters} == {"unet", "te1", "te2"}
    path = export(config, fresh, load_dataset(config.data), network)
    baseline = generate(fresh)
    ours = generate(fresh, network=network)
    assert (ours - baseline).abs().max() > 1e-3, "the adapters must change the image for the test to mean anything"
    theirs = generate(fresh, lora_path=path)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-4)
    components = (fresh.unet, fresh.text_encoder, fresh.text_encoder_2)
    loaded = sum(any(getattr(module, name, None) is not None for name in ("lora_layer", "lora_linear_layer"))
                 for component in components for module in component.modules())  # diffusers' LoRA layers
    assert loaded == len(network.adapters), "every tensor of the file found its layer"


@pytest.mark.parametrize("row", ["floor", "reference"])
def test_bench_loops_condition_an_sdxl_unet(tiny_sdxl, row):
    from lora_train.bench_loops import BenchSettings, run_row

    result = run_row(row, BenchSettings(model=str(tiny_sdxl), steps=1, warmup=1))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
