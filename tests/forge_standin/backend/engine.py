"""Stand-in for backend/diffusion_engine/sd15.py and what it holds, built around a tiny ldm SD1 model.

`StableDiffusion(ldm_model, clip_dir)` gives the tiny model Forge's shape: `forge_objects.unet` (a patcher of a
KModel with `predictor`, `storage_dtype`, `computation_dtype` and the compvis-named `diffusion_model`),
`forge_objects.clip` (JointTextEncoder `clip_l.transformer`, stored float16 and cast per layer),
`forge_objects.vae`, `text_processing_engine`, `cond_stage_model = first_stage_model = None`. Layers are Forge's
classes (`operations.forge_layers`); the transformer block adds in place after its LayerNorms and raises on
its checkpoint switch, as Forge's `backend/nn/unet.py` does; `load()` turns every weight into an inference
tensor with requires_grad=True and leaves every module in training mode, as Forge's loader does.
"""

import torch
from ldm.modules.attention import BasicTransformerBlock as LdmBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock as LdmResBlock

from backend import memory_management, operations
from backend.patcher.base import ModelPatcher


class BasicTransformerBlock(LdmBlock):
    def forward(self, x, context=None, transformer_options=None):
        if self.checkpoint:
            raise NotImplementedError("Gradient Checkpointing is not implemented.")
        n = self.norm1(x)
        x += self.attn1(n, context=context if self.disable_self_attn else None)
        n = self.norm2(x)
        x += self.attn2(n, context=context)
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


class ResBlock(LdmResBlock):
    def forward(self, x, emb):
        if self.use_checkpoint:
            raise NotImplementedError("Gradient Checkpointing is not implemented.")
        return self._forward(x, emb)


class Prediction:
    """k-diffusion epsilon prediction over the model's schedule (backend/modules/k_prediction.py)."""

    def __init__(self, alphas_cumprod):
        self.prediction_type = "epsilon"
        self.alphas_cumprod = alphas_cumprod.float()
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def timestep(self, sigma):
        return (sigma.reshape(-1, 1) - self.sigmas.reshape(1, -1)).abs().argmin(dim=1).float()

    def calculate_input(self, sigma, x):
        return x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1) ** 0.5

    def calculate_denoised(self, sigma, output, x):
        return x - output * sigma.reshape(-1, 1, 1, 1)


class KModel(torch.nn.Module):
    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = Prediction(alphas_cumprod)
        self.storage_dtype = self.computation_dtype = torch.float32

    def apply_model(self, x, sigma, c_crossattn=None):
        xc = self.predictor.calculate_input(sigma, x).to(self.computation_dtype)
        out = self.diffusion_model(xc, self.predictor.timestep(sigma), context=c_crossattn.to(self.computation_dtype),
                                   transformer_options={}).float()
        return self.predictor.calculate_denoised(sigma, out, x)


class TextProcessingEngine:
    """backend/text_processing/classic_engine.py, one 77-token chunk: clip skip, final layer norm, float32."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer, self.clip_skip = text_encoder, tokenizer, 1

    def __call__(self, texts):
        embeddings = self.text_encoder.transformer.text_model.embeddings
        embeddings.token_embedding = embeddings.token_embedding.to(dtype=torch.float32)
        embeddings.position_embedding = embeddings.position_embedding.to(dtype=torch.float32)
        tokens = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
        outputs = self.text_encoder.transformer(tokens, output_hidden_states=True)
        z = outputs.hidden_states[-max(self.clip_skip, 1)]
        return self.text_encoder.transformer.text_model.final_layer_norm(z)


class ForgeObjects:
    def __init__(self, unet, clip, vae):
        self.unet, self.clip, self.vae = unet, clip, vae

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae)


class Holder:
    """A CLIP or VAE patcher holder (backend/patcher/clip.py, vae.py)."""

    def __init__(self, **parts):
        self.__dict__.update(parts)

    def clone(self):
        return Holder(**{**self.__dict__, "patcher": self.patcher.clone()})


def load(module: torch.nn.Module) -> None:
    """Every weight an inference tensor with requires_grad=True, every module in training mode."""
    with torch.inference_mode():
        for sub in module.modules():
            for name, parameter in list(sub._parameters.items()):
                if parameter is not None:
                    sub._parameters[name] = torch.nn.Parameter(parameter.detach().clone())
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[name] = buffer.clone()
    for sub in module.modules():  # ldm replaces the VAE's train() with a no-op: set the flag itself
        sub.training = True


def _forge_unet(unet: torch.nn.Module) -> torch.nn.Module:
    operations.forge_layers(unet, manual_cast=False)
    for module in unet.modules():
        if type(module) is LdmBlock:
            module.__class__, module.checkpoint = BasicTransformerBlock, False
        elif type(module) is LdmResBlock:
            module.__class__, module.use_checkpoint = ResBlock, False
    return unet


class StableDiffusion:
    """The engine Forge's loader builds for an SD1 checkpoint (the tiny ldm model's weights, Forge's shape)."""

    def __init__(self, ldm_model, tokenizer):
        text = ldm_model.cond_stage_model.transformer
        operations.forge_layers(text, manual_cast=True)
        clip_l = torch.nn.Module()
        clip_l.transformer = text.half()  # Forge stores the text encoder in float16 and casts per layer
        joint = torch.nn.ModuleDict({"clip_l": clip_l})
        k_model = KModel(_forge_unet(ldm_model.model.diffusion_model), ldm_model.alphas_cumprod)
        vae = ldm_model.first_stage_model
        for module in (k_model, joint, vae):
            load(module)
        self.scale_factor = ldm_model.scale_factor
        self.forge_objects = ForgeObjects(ModelPatcher(k_model),
                                          Holder(cond_stage_model=joint, patcher=ModelPatcher(joint)),
                                          Holder(first_stage_model=vae, patcher=ModelPatcher(vae)))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.text_processing_engine = TextProcessingEngine(clip_l, tokenizer)
        self.current_lora_hash = str([])
        self.cond_stage_model = self.first_stage_model = None
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_inpaint = True, False, False, False

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        return self.text_processing_engine(prompts)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        return self.forge_objects.vae.first_stage_model.encode(x).mode() * self.scale_factor

    @torch.inference_mode()
    def decode_first_stage(self, z):
        return self.forge_objects.vae.first_stage_model.decode(z / self.scale_factor)
