"""The three training loops `bench train` compares, each timed in its own process on the same model and data.

- floor: the bare step (UNet forward + backward + AdamW on pre-made latents and conditioning, only the LoRA
  parameters trainable, nothing else; for sd15/sdxl only the UNet is built). No LoRA step can be faster than this.
- ours: `pipeline.train_lora` under the default config (batch size, rank and text-encoder training as asked).
- fast: ours with FAST_PATH on top of the defaults; compiled: ours with training.compile (torch.compile).
- cli: what `lora-train train` does, from the checkpoint file on: `cli_train.load_for_training` (read tensor by
  tensor, the UNet only after caching), then ours; its peak memory is the whole command's.
- reference: a plain loop in the style of diffusers' `examples/text_to_image/train_text_to_image_lora.py`
  (`train_text_to_image_lora_sdxl.py` for SDXL): peft-injected LoRA, the VAE and the text encoder(s) run every step.

`run_row` runs one loop and returns its per-step times, losses and peak memory (the process's peak RSS on the
CPU, `torch.cuda.max_memory_allocated` on a GPU); `bench_train` calls it in a fresh process per row, so one row's
memory never counts against another.
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .models.conditioning import Cond
from .models.sdxl_convert import SIZE_NUMBERS

LEARNING_RATE = 1e-4
FAST_PATH = {"matmul_precision": "medium"}  # what measured fastest on the CPU (see --compile for torch.compile)
# the modules our default targets adapt in every transformer block; the reference adapts the same ones
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass
class BenchSettings:
    model: str = "sd15"  # sd15, sdxl or a checkpoint path
    device: str = "cpu"
    resolution: int = 64  # image side; latents are resolution / 8
    steps: int = 5  # timed steps (the median is reported)
    warmup: int = 2  # untimed steps first
    batch_size: int = 1
    rank: int = 8
    threads: int = 0  # torch threads per row; 0 = torch's default
    gradient_checkpointing: bool = False  # in every row (ours through its config)
    seed: int = 0
    checkpoint: str = ""  # the file (or folder) the cli row loads; "" = model
    precision: str = "fp16"  # fp16 or bf16: the frozen weights and autocast on a GPU (the CPU is always fp32)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


@dataclass
class RowResult:
    name: str
    step_seconds: List[float]  # every step, warm-up included
    losses: List[float]
    peak_bytes: int
    warmup: int
    parameters: int = 0  # UNet parameters
    setup_seconds: float = 0.0  # fast and compiled rows: the first step (which compiles, in the compiled row)
    notes: List[str] = field(default_factory=list)
    estimate_bytes: int = 0  # ours: the memory preflight's estimate of the peak for these settings

    @property
    def median_ms(self) -> float:
        timed = sorted(self.step_seconds[self.warmup:])
        middle = len(timed) // 2
        return 1000 * (timed[middle] if len(timed) % 2 else (timed[middle - 1] + timed[middle]) / 2)


def run_row(name: str, settings: BenchSettings) -> RowResult:
    """Builds the model and data in this process, runs one loop, and measures it."""
    from .bench_models import build_bench_model, write_bench_images

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        images = write_bench_images(Path(folder) / "images", settings)
        estimates: List[int] = []
        if name == "cli":
            model, (times, losses) = _cli(images, settings, Path(folder))
        else:
            model = build_bench_model(settings.model, device, encoders=name != "floor", dtype=_dtype(settings))
            loop = {"floor": _floor, "ours": partial(_ours, estimates=estimates), "reference": _reference,
                    "fast": _fast, "compiled": _compiled}
            times, losses = loop[name](model, images, settings, Path(folder))
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    setup = times[0] if name in ("fast", "compiled") else 0.0
    return RowResult(name, times, losses, peak, settings.warmup, sum(p.numel() for p in model.unet.parameters()),
                     setup, estimate_bytes=estimates[0] if estimates else 0)


def _dtype(settings: BenchSettings) -> torch.dtype:
    """The frozen weights' dtype: the settings' precision on a GPU, fp32 on the CPU."""
    if torch.device(settings.device).type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[settings.precision]


def _preflight_estimate(model, config, settings: BenchSettings) -> int:
    """The bytes the memory preflight estimates for this run, computed as the pipeline does before step 1."""
    from .pipeline import attached, build_network
    from .preflight import activation_bytes_per_pixel, estimate_memory

    network = build_network(config, model)
    with model.training(config.training.gradient_checkpointing, False), attached(network):
        per_pixel = activation_bytes_per_pixel(model)
    adapters = sum(p.numel() for p in network.parameters())
    del network
    return estimate_memory(model, config, (settings.resolution,) * 2, adapters, per_pixel).total


def _timed(step: Callable[[int], float], count: int, device: torch.device) -> Tuple[List[float], List[float]]:
    times, losses = [], []
    for index in range(count):
        started = time.perf_counter()
        losses.append(step(index))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return times, losses


def bench_config(images: Path, settings: BenchSettings, out: Path, **training):
    from .config import DataConfig, TrainConfig

    config = TrainConfig(data=DataConfig(train_data_dir=str(images), resolution=settings.resolution,
                                         min_bucket_reso=64, max_bucket_reso=max(64, settings.resolution)))
    config.model.lora_rank, config.model.alpha, config.model.train_text_encoder = settings.rank, settings.rank, False
    training = dict(batch_size=settings.batch_size, max_train_steps=settings.total_steps, seed=settings.seed,
                    mixed_precision=settings.precision,
                    learning_rate=LEARNING_RATE, gradient_checkpointing=settings.gradient_checkpointing, **training)
    for key, value in training.items():
        setattr(config.training, key, value)
    config.output.output_dir, config.output.output_name = str(out / "output"), "bench"
    return config.validate(require_base_model=False)


def _ours(model, images: Path, settings: BenchSettings, out: Path, estimates: Optional[List[int]] = None,
          **training) -> Tuple[List[float], List[float]]:
    """Our pipeline's steps; `estimates` (if given) gets the preflight's estimate, taken before the run."""
    from .pipeline import train_lora

    marks: List[float] = []

    def clock(event: str, _trainer) -> None:
        if event in ("start", "step"):
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            marks.append(time.perf_counter())
    config = bench_config(images, settings, out, **training)
    if estimates is not None:
        estimates.append(_preflight_estimate(model, config, settings))
    result = train_lora(config, model, callbacks=[clock])
    return [after - before for before, after in zip(marks, marks[1:])], result.losses


def _cli(images: Path, settings: BenchSettings, out: Path):
    """(model, (times, losses)) of the command line's run on the checkpoint file `settings.model`."""
    from .cli_train import load_for_training

    config = bench_config(images, settings, out)
    config.model.base_model = settings.checkpoint or settings.model
    model = load_for_training(config, torch.device(settings.device))
    return model, _ours(model, images, settings, out)


def _fast(model, images: Path, settings: BenchSettings, out: Path) -> Tuple[List[float], List[float]]:
    return _ours(model, images, settings, out, **FAST_PATH)


def _compiled(model, images: Path, settings: BenchSettings, out: Path) -> Tuple[List[float], List[float]]:
    return _ours(model, images, settings, out, compile=True)


def _premade(model, images: Path, settings: BenchSettings):
    """Pixels, captions, latents and conditioning (a Cond) of every image."""
    from .config import DataConfig
    from .dataset import load_dataset

    dataset = load_dataset(DataConfig(train_data_dir=str(images), resolution=settings.resolution,
                                      min_bucket_reso=64, max_bucket_reso=max(64, settings.resolution)))
    with torch.no_grad():
        pixels = torch.stack([dataset.load_pixels(i) for i in range(len(dataset.samples))])
        latents = model.encode_images(pixels).float()
        cond = model.encode_prompts([s.caption for s in dataset.samples],
                                    [dataset.size_info(i) for i in range(len(dataset.samples))])
    return pixels, [s.caption for s in dataset.samples], latents, cond


def _adamw(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=1e-2)


def _floor(model, images: Path, settings: BenchSettings, _out: Path) -> Tuple[List[float], List[float]]:
    from .models import TargetSpec
    from .network import NetworkSpec, create_network

    generator = torch.Generator().manual_seed(settings.seed)
    side, unet = settings.resolution // 8, model.unet
    latents = torch.randn((4, unet.config.in_channels, side, side), generator=generator).to(model.device)
    cond = _random_cond(model, settings, generator)
    unet.requires_grad_(False)
    _checkpointing(unet, settings)
    network = create_network(model.lora_targets(TargetSpec(text_encoder=False)),
                             NetworkSpec(rank=settings.rank, alpha=settings.rank), device=model.device)
    network.attach()
    optimizer = _adamw(network.parameters())
    batches = _batches(latents, cond, settings, generator, len(model.alphas_cumprod))
    alphas = model.alphas_cumprod.to(model.device)

    def step(index: int) -> float:
        x0, c, noise, t = batches[index]
        a = alphas[t].view(-1, 1, 1, 1)
        with _autocast(model.device, settings):
            prediction = model.predict(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, c)
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    times, losses = _timed(step, settings.total_steps, model.device)
    return times, [float(loss) for loss in losses]


def _batches(latents, cond, settings: BenchSettings, generator, timesteps: int):
    """Every step's (latents, cond, noise, timesteps), drawn up front and already on the device."""
    batches = []
    for index in range(settings.total_steps):
        rows = [(index * settings.batch_size + k) % len(latents) for k in range(settings.batch_size)]
        x0 = latents[rows]
        c = Cond(cond.crossattn[rows], None if cond.vector is None else cond.vector[rows])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, timesteps, (len(rows),), generator=generator)
        batches.append((x0, c, noise.to(x0.device), t.to(x0.device)))
    return batches


def _random_cond(model, settings: BenchSettings, generator) -> Cond:
    """Conditioning of the model's shape for 4 samples; SDXL's vector: a random pooled embedding and the sizes."""
    config, device = model.unet.config, model.device
    crossattn = torch.randn((4, 77, config.cross_attention_dim), generator=generator).to(device, model.unet.dtype)
    if config.addition_embed_type != "text_time":
        return Cond(crossattn)
    pooled = config.projection_class_embeddings_input_dim - SIZE_NUMBERS * config.addition_time_embed_dim
    side = float(settings.resolution)
    sizes = torch.tensor([[side, side, 0.0, 0.0, side, side]]).expand(4, -1)
    vector = torch.cat([torch.randn((4, pooled), generator=generator), sizes], dim=1)
    return Cond(crossattn, vector.to(device, model.unet.dtype))


def _checkpointing(unet, settings: BenchSettings) -> None:
    """diffusers' own gradient checkpointing, as the reference script turns it on (it acts in train mode)."""
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()


def _autocast(device: torch.device, settings: BenchSettings):
    """fp16 or bf16 autocast on a GPU (the frozen weights' dtype), none on the CPU (fp32)."""
    return torch.autocast("cuda", dtype=_dtype(settings) if device.type == "cuda" else torch.float16,
                          enabled=device.type == "cuda")


def _reference(model, images: Path, settings: BenchSettings, _out: Path) -> Tuple[List[float], List[float]]:
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    pixels, captions, _, _ = _premade(model, images, settings)
    unet, vae = model.unet, model.vae
    for component in (unet, *model.encoders().values()):
        component.requires_grad_(False)
    _checkpointing(unet, settings)
    unet.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.rank, init_lora_weights="gaussian",
                                target_modules=PEFT_TARGETS))
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    for parameter in lora_parameters:
        parameter.data = parameter.data.float()  # the script keeps trainable LoRA weights in fp32
    optimizer = _adamw(lora_parameters)
    scheduler = DDPMScheduler(num_train_timesteps=len(model.alphas_cumprod), beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(settings.seed)

    def step(index: int) -> float:
        rows = [(index * settings.batch_size + k) % len(pixels) for k in range(settings.batch_size)]
        with _autocast(model.device, settings):
            latents = vae.encode(pixels[rows].to(model.device, vae.dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), device=model.device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            cond, added = _reference_prompts(model, [captions[r] for r in rows], settings.resolution)
            prediction = unet(noisy, timesteps, cond, added_cond_kwargs=added, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    times, losses = _timed(step, settings.total_steps, model.device)
    return times, [float(loss) for loss in losses]


def _reference_prompts(model, captions: List[str], side: int):
    """(encoder_hidden_states, added_cond_kwargs) as the diffusers scripts compute them, every step."""
    def ids(tokenizer):
        return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(model.device)
    if model.family != "sdxl":
        return model.text_encoder(ids(model.tokenizer), return_dict=False)[0], None
    # train_text_to_image_lora_sdxl.py: both encoders' penultimate hidden states, the second's pooled output,
    # and the (original, crop, target) size ids
    hidden = []
    for encoder, tokenizer in ((model.text_encoder, model.tokenizer), (model.text_encoder_2, model.tokenizer_2)):
        output = encoder(ids(tokenizer), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
    time_ids = torch.tensor([[side, side, 0, 0, side, side]] * len(captions), device=model.device)
    return torch.cat(hidden, dim=-1), {"text_embeds": output[0], "time_ids": time_ids.to(output[0].dtype)}
