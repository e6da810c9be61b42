"""The models and images the training benchmark runs on, built in code (no hub, no downloads).

`tiny` is the tiny SD1-topology checkpoint of `lora_train.tiny` (built once by the parent process), loaded the
way users' files are; any other path is a user's SD1/SD2/SDXL checkpoint file or diffusers folder. `sd15` is the
real SD1.5 architecture, randomly initialised: UNet (859.5M parameters, diffusers' default UNet config is
SD1's), the SD VAE and the CLIP ViT-L/14 text encoder. `sdxl` is SDXL base's: UNet (2567.5M), the VAE's
architecture (SDXL's differs from SD's in weights only), CLIP ViT-L/14 and OpenCLIP ViT-bigG/14's text towers.
Random weights time exactly like trained ones. `write_sd15_file` saves the sd15 architecture as users download
it: one fp16 `.safetensors` in the original ldm layout (built with ldm's own UNet and VAE classes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models.common import scaled_linear_alphas_cumprod
from .models.diffusers_model import DiffusersModel
from .models.text_encoders import sd1_vit_l_config

BENCH_ARCHITECTURES = ("sd15", "sdxl")
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
# SDXL base's UNet (2567.5M parameters): 3 levels, attention with 64-channel heads at 2 and 4x down-sampling
SDXL_UNET = dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# OpenCLIP ViT-bigG/14's text tower, SDXL's second text encoder (all 32 layers: the pooled output needs the last)
SDXL_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", max_position_embeddings=77, projection_dim=1280, vocab_size=49408,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)


def build_bench_model(name: str, device: torch.device, encoders: bool = True,
                      dtype: torch.dtype = torch.float32) -> DiffusersModel:
    """sd15, sdxl or a checkpoint path on device, the UNet and text encoders in `dtype` (the VAE fp32).

    sd15 and sdxl without encoders have only their UNet (the floor's memory is the UNet's).
    """
    from .models.diffusers import load_diffusers_model

    builders = {"sd15": _sd15, "sdxl": _sdxl}
    model = builders[name](encoders) if name in builders else load_diffusers_model(name)
    return model.to(device, dtype)


def _sd15(encoders: bool) -> DiffusersModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .models.clip_tokenizer import cached_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # the defaults are SD1's
    text_encoder = vae = torch.nn.Identity()
    if encoders:
        text_encoder = CLIPTextModel(sd1_vit_l_config())
        vae = AutoencoderKL(**SD15_VAE)
    return DiffusersModel(unet=unet, vae=vae, text_encoder=text_encoder,
                          tokenizer=CLIPTokenizer.from_pretrained(cached_clip_tokenizer()),
                          alphas_cumprod=scaled_linear_alphas_cumprod(), prediction="epsilon",
                          family="sd1", name="sd15-random")


def _sdxl(encoders: bool) -> DiffusersModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .models.clip_tokenizer import EOS, cached_clip_tokenizer
    from .models.diffusers_xl import OPEN_CLIP_PAD, SdxlModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET)
    text_encoders, vae = [torch.nn.Identity(), torch.nn.Identity()], torch.nn.Identity()
    if encoders:
        text_encoders = [CLIPTextModel(sd1_vit_l_config()), CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_BIGG))]
        vae = AutoencoderKL(**{**SD15_VAE, "scaling_factor": 0.13025})
    tokenizers = [CLIPTokenizer.from_pretrained(cached_clip_tokenizer(pad)) for pad in (EOS, OPEN_CLIP_PAD)]
    return SdxlModel(unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                     alphas_cumprod=scaled_linear_alphas_cumprod(), prediction="epsilon", name="sdxl-random")


def write_sd15_file(path: Path, seed: int = 0) -> Path:
    """An SD1.5-architecture single file (random weights, fp16, ldm layout), built one component at a time and
    halved in place, so building it takes about the fp32 UNet's memory."""
    from ldm.util import instantiate_from_config
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from .models.diffusers_model import CONFIG_DIR, load_model_config
    from .tiny import randomise_zero_weights

    params = load_model_config(CONFIG_DIR / "ldm" / "sd1.yaml").model.params
    params.first_stage_config.params.lossconfig = {"target": "torch.nn.Identity"}
    torch.manual_seed(seed)
    builders = {"model.diffusion_model.": lambda: randomise_zero_weights(
                    instantiate_from_config(params.unet_config), seed + 1),
                "first_stage_model.": lambda: instantiate_from_config(params.first_stage_config),
                "cond_stage_model.transformer.": lambda: CLIPTextModel(sd1_vit_l_config())}
    tensors = {}
    for prefix, build in builders.items():
        module = build()
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.half() if tensor.is_floating_point() else tensor.data
        tensors.update({prefix + name: value.contiguous() for name, value in module.state_dict().items()})
        del module
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def write_bench_images(folder: Path, settings) -> Path:
    """4 square images of the benchmark's resolution, each with a caption file."""
    from .bench_caption import make_bench_images

    folder.mkdir(parents=True)
    for index, image in enumerate(make_bench_images(4, settings.resolution, settings.seed)):
        image.save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"bench image {index}, a colour gradient", encoding="utf-8")
    return folder
