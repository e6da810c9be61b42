"""The training loop: noise, target, loss, optimizer, schedule, accumulation, precision, checkpoints, stop.

It knows the diffusion maths and the `DiffusionModel` protocol, nothing about the WebUI or a model family.
Every random draw of micro-step k comes from generators seeded with (seed, k), so a run is deterministic for a
seed and a resumed run continues exactly where the checkpoint left off. Latents and (when the text encoder is not
trained) text-encoder outputs come from `encode_cache`, identical whether cached or not; when both are cached,
the VAE and text encoder are offloaded for the loop and brought back exactly afterwards; a model whose UNet is still
in its file (`load_unet`) reads it only then. Progress goes to callbacks
`fn(event, trainer)` with events "cache", "start", "step", "epoch", "checkpoint"; `request_stop("save"|"discard")` is
honoured before the next micro-batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .checkpoint import Position, check_settings, checkpoint_folder, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .encode_cache import LatentCache, TextCache
from .losses import diffusion_target, min_snr_weight, noisy_latents
from .models.conditioning import Cond
from .runtime import Offloader, autocast_dtype, channels_last
from .optim import build_optimizer, build_scheduler
from .schedule import effective_schedule

logger = logging.getLogger(__name__)
Callback = Callable[[str, "Trainer"], None]
MAX_CONSECUTIVE_SKIPS = 3
STOP_MODES = ("save", "discard")


@dataclass
class StepInfo:
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float = float("nan")
    lr: float = 0.0
    seconds_per_step: float = 0.0
    cached: int = 0
    cache_total: int = 0

    @property
    def eta_s(self) -> float:
        return max(0, self.total_steps - self.step) * self.seconds_per_step


def step_plan(dataset, training) -> Tuple[int, int]:
    """(optimizer steps per epoch, total steps): an epoch's last micro-batches form a short accumulation group."""
    per_epoch = math.ceil(dataset.steps_per_epoch(training.batch_size) / training.gradient_accumulation_steps)
    return per_epoch, training.max_train_steps or per_epoch * training.epochs


def _micro_seed(seed: int, micro_step: int) -> int:
    return (seed * 1_000_003 + micro_step) % (2 ** 63)


class TrainingDivergedError(ValueError):
    """The loss stopped being a finite number; the message says what to change, `changes` the settings that
    would ({"training.learning_rate": 5e-5}; empty when the fix is not a setting)."""

    def __init__(self, message: str, changes: Optional[Dict[str, object]] = None):
        super().__init__(message)
        self.changes = dict(changes or {})


class Trainer:
    """Trains a LoRANetwork already attached to a model in its training() context."""

    def __init__(self, model, network, dataset, config: TrainConfig, device: torch.device):
        self.model, self.network, self.dataset, self.config = model, network, dataset, config
        self.device = torch.device(device)
        train = config.training
        self.batches_per_epoch = dataset.steps_per_epoch(train.batch_size)
        _, self.total_steps = step_plan(dataset, train)
        self.optimizer = build_optimizer(train.optimizer, network.param_groups(
            train.learning_rate, train.effective_text_encoder_lr))
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = build_scheduler(self.optimizer, train.lr_scheduler, train.lr_warmup_steps, self.total_steps)
        self.autocast_dtype = autocast_dtype(train.mixed_precision, self.device)
        self.scaler = _grad_scaler(self.autocast_dtype == torch.float16)
        self.position = Position()
        self.info = StepInfo(total_steps=self.total_steps)
        self.stop_mode: Optional[str] = None
        folder = config.output.latent_cache_dir if train.cache_latents_to_disk else None
        self.latents = LatentCache(model, dataset, store=train.cache_latents, folder=folder)
        self.texts = TextCache(model, store=train.cache_text_encoder_outputs and not config.model.train_text_encoder
                               and not config.data.shuffle_captions)
        self.schedule = effective_schedule(model, config)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(self.device)
        self.predict = torch.compile(model.predict) if train.compile else model.predict
        self.last_checkpoint: Optional[Path] = None
        self.run_id: Optional[str] = None  # written into each checkpoint: the run it belongs to
        self.save_failures: List[str] = []  # checkpoints and epoch files that could not be written
        self.offloader = Offloader([], self.device)  # encoders leave the device while their outputs are cached
        self.skipped_steps = self.consecutive_skips = 0
        self._epoch_order: Tuple[int, List[List[int]]] = (-1, [])
        self._callbacks: List[Callback] = []

    def add_callback(self, callback: Callback) -> None:
        self._callbacks.append(callback)

    def _trigger(self, event: str) -> None:
        for callback in self._callbacks:
            callback(event, self)

    def request_stop(self, mode: str = "save") -> None:
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {STOP_MODES}, not {mode!r}")
        self.stop_mode = mode

    @property
    def settings(self) -> Dict:
        """What a resumed run must share with the checkpoint: data order, shapes and what the UNet learns to output."""
        train, model = self.config.training, self.config.model
        return {"batch_size": train.batch_size, "gradient_accumulation_steps": train.gradient_accumulation_steps,
                "seed": train.seed, "lora_rank": model.lora_rank, "conv_rank": model.conv_rank,
                "train_text_encoder": model.train_text_encoder, "images": len(self.dataset.samples),
                "prediction": self.schedule.prediction, "zero_terminal_snr": self.schedule.zero_terminal_snr}

    def run(self) -> Position:
        """Trains until total_steps or a stop request; returns where it stopped."""
        if self.config.training.resume_from_checkpoint:
            self.resume(Path(self.config.training.resume_from_checkpoint))
        encoders = list(self.model.encoders().values()) if self.prepare_caches() else []
        # the UNet changes memory order only while the encoders are away, so their weights and its copies never add up
        relayout = self.config.training.channels_last and self.model.relayout
        with self._encoders_away(encoders), self._unet_loaded(), channels_last(self.model.unet, relayout):
            self._trigger("start")
            started, start_step = time.perf_counter(), self.position.step
            while self.position.step < self.total_steps and self.stop_mode is None:
                self._train_step()
                done = self.position.step - start_step
                self.info.seconds_per_step = (time.perf_counter() - started) / done
                self._after_step()
        return self.position

    @contextlib.contextmanager
    def _encoders_away(self, encoders: List[torch.nn.Module]):
        """Offloads the encoders for the loop; afterwards the model decides when they come back
        (`release_encoders`: at once for a host's model, when next used for the CLI's)."""
        self.offloader = Offloader(encoders, self.device)
        self.offloader.offload()
        try:
            yield
        finally:
            self.model.release_encoders(self.offloader)

    @contextlib.contextmanager
    def _unet_loaded(self):
        """A model that keeps its UNet in the file until needed (the CLI's) reads it now: after the caches are
        filled and the encoders are away, so the UNet's weights and theirs are never in memory together."""
        self.model.load_unet()
        yield

    def _after_step(self) -> None:
        self._trigger("step")
        output = self.config.output
        if output.save_steps and self.position.step % output.save_steps == 0:
            self.save_checkpoint()
        if self.position.batch == 0:  # the step finished an epoch
            self._trigger("epoch")

    def _micro_batches(self) -> List[Tuple[int, int, List[int]]]:
        """The next accumulation group: (micro_step, epoch, indices) per micro-batch; advances the position."""
        group = []
        for _ in range(self.config.training.gradient_accumulation_steps):
            position = self.position
            group.append((position.epoch * self.batches_per_epoch + position.batch, position.epoch,
                          self._batches(position.epoch)[position.batch]))
            position.batch += 1
            if position.batch == self.batches_per_epoch:
                position.epoch, position.batch = position.epoch + 1, 0
                break  # an epoch boundary ends the group, as the last partial batch of an epoch does
        return group

    def _batches(self, epoch: int) -> List[List[int]]:
        if self._epoch_order[0] != epoch:
            train = self.config.training
            self._epoch_order = (epoch, self.dataset.epoch_batches(train.batch_size, epoch, train.seed))
        return self._epoch_order[1]

    def _train_step(self) -> None:
        group = self._micro_batches()
        losses = [self._micro_step(micro_step, indices, len(group)) for micro_step, _, indices in group]
        losses = [loss for loss in losses if loss is not None]  # None: every image of the micro-batch is gone
        loss = sum(losses) / len(losses) if losses else float("nan")
        self._optimizer_step()
        self.position.step += 1
        self.position.losses.append(loss)
        self.info.step, self.info.epoch = self.position.step, group[-1][1]
        self.info.loss, self.info.lr = self.position.losses[-1], self.scheduler.get_last_lr()[0]

    def _micro_step(self, micro_step: int, indices: List[int], group_size: int) -> Optional[float]:
        seed = _micro_seed(self.config.training.seed, micro_step)
        rng, generator = random.Random(seed), torch.Generator(device=self.device).manual_seed(seed)
        flips = [self.config.data.flip_aug and rng.random() < 0.5 for _ in indices]
        captions = [self.dataset.caption_for(index, rng) for index in indices]
        # before seeding: an uncached encode draws from the global RNG; an image gone since the scan is left out
        kept, latents = self.latents.batch(indices, flips)
        if not kept:
            return None
        indices, flips, captions = ([values[i] for i in kept] for values in (indices, flips, captions))
        torch.manual_seed(seed)  # adapter dropout draws from the global RNG
        with self._autocast():
            cond = self._encode_prompts(captions, indices, flips)
            loss = self._loss(latents, cond, generator)
        value = loss.item()  # the step's one wait for the device
        if not math.isfinite(value):
            raise self._diverged(value, cond, indices)
        self.scaler.scale(loss / group_size).backward()
        return value

    def _diverged(self, loss: float, cond: Cond, indices: List[int]) -> "TrainingDivergedError":
        """Says which part produced the non-number, for which images, and the settings that fix it (`changes`)."""
        names = ", ".join(self.dataset.samples[i].path.name for i in indices)
        step, train = self.position.step + 1, self.config.training
        if not cond.isfinite():
            head = f"the text encoder's output was not a number at step {step} for the captions of {names}"
            if self.config.model.train_text_encoder and self._base_encodes(indices):
                lower = train.effective_text_encoder_lr / 2
                return TrainingDivergedError(
                    f"{head}, while the checkpoint's own text encoder gives numbers for them: its adapters "
                    f"diverged; lower training.text_encoder_lr (e.g. to {lower:g}), or set "
                    "model.train_text_encoder: false", {"training.text_encoder_lr": lower})
            return TrainingDivergedError(f"{head}, and the checkpoint's own text encoder fails on them too (not "
                                         "the adapters): shorten or fix those captions")
        changes: Dict[str, object] = {"training.learning_rate": train.learning_rate / 2}
        if train.max_grad_norm != 1:
            changes["training.max_grad_norm"] = 1.0
        if train.mixed_precision == "fp16":
            changes["training.mixed_precision"] = "bf16"
        return TrainingDivergedError(
            f"the loss became {loss} at step {step} (images {names}); lower training.learning_rate "
            "(e.g. halve it), keep training.max_grad_norm at 1, or use mixed_precision bf16 instead of fp16", changes)

    def _base_encodes(self, indices: List[int]) -> bool:
        """Whether the checkpoint's text encoder alone (adapters off) gives finite outputs for these captions."""
        captions = [self.dataset.samples[i].caption for i in indices]
        sizes = [self.dataset.size_info(i, False) for i in indices]
        multiplier, self.network.multiplier = self.network.multiplier, 0.0
        try:
            with torch.no_grad(), self._autocast():
                return self.model.encode_prompts(captions, sizes).isfinite()
        finally:
            self.network.multiplier = multiplier

    def _loss(self, latents: torch.Tensor, cond: Cond, generator: torch.Generator) -> torch.Tensor:
        train = self.config.training
        alphas_cumprod = self.alphas_cumprod
        device = self.device  # drawn where they are used: no per-step copies from the host
        noise = torch.randn(latents.shape, generator=generator, device=device)
        if train.noise_offset:
            noise += train.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device)
        timesteps = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator, device=device)
        alpha_bar = alphas_cumprod[timesteps]
        prediction = self.predict(noisy_latents(latents, noise, alpha_bar), timesteps, cond)
        target = diffusion_target(latents, noise, alpha_bar, self.schedule.prediction)
        loss = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if train.min_snr_gamma:
            loss = loss * min_snr_weight(alpha_bar, train.min_snr_gamma, self.schedule.prediction)
        return loss.mean()

    def _encode_prompts(self, captions: List[str], indices: List[int], flips: List[bool]) -> Cond:
        sizes = [self.dataset.size_info(i, flip) for i, flip in zip(indices, flips)]
        if self.config.model.train_text_encoder:
            return self.model.encode_prompts(captions, sizes)
        return self.texts.encode(captions, sizes)

    def _optimizer_step(self) -> None:
        """Clips and applies the gradients; a step whose gradients are not finite is skipped, not applied.

        fp16's GradScaler skips such steps by itself (and lowers its scale); in fp32/bf16 one infinite value
        would turn every adapter weight into NaN, so the step is dropped here, and three in a row stop the run.
        """
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.training.max_grad_norm or float("inf"))
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            self._skip_step()
        else:
            self.consecutive_skips = 0
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _skip_step(self) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        logger.warning("step %d: gradients are not finite; the step is skipped", self.position.step + 1)
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingDivergedError(
                f"gradients were not finite for {MAX_CONSECUTIVE_SKIPS} steps in a row (at step "
                f"{self.position.step + 1}); lower training.learning_rate or use mixed_precision bf16",
                {"training.learning_rate": self.config.training.learning_rate / 2})

    def prepare_caches(self) -> bool:
        """Fills the enabled caches; True when the loop then needs neither the VAE nor the text encoder."""
        samples, data = self.dataset.samples, self.config.data
        if self.config.training.cache_latents:
            flips = (False, True) if data.flip_aug else (False,)
            keys = [(index, flip) for index in range(len(samples)) for flip in flips]
            self.info.cache_total = len(keys)
            self.latents.fill(keys, self._cached)
        if not (self.texts.store and self.config.training.cache_latents):
            return False
        flips = (False, True) if data.flip_aug else (False,)
        pairs = {(sample.caption, self.dataset.size_info(index, flip))
                 for index, sample in enumerate(samples) for flip in flips}
        pairs |= {("", size) for _, size in pairs} if data.caption_dropout else set()
        return self.texts.fill(sorted(pairs))

    def _cached(self, done: int) -> None:
        self.info.cached = done
        self._trigger("cache")

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def checkpoint_dir(self) -> Path:
        return checkpoint_folder(self.config.output, self.position.step)

    def save_checkpoint(self) -> Optional[Path]:
        """Writes a checkpoint; one that cannot be written (a full disk) is reported and training goes on."""
        extra = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "run": self.run_id}
        try:
            folder = save_checkpoint(self.checkpoint_dir(), self.network.state_dict(), self.optimizer, extra,
                                     self.position, self.settings)
        except OSError as error:
            self.save_failures.append(f"checkpoint at step {self.position.step}: {error.strerror or error}")
            logger.warning("the checkpoint at step %d could not be written (%s); training goes on",
                           self.position.step, error)
            return None
        self.last_checkpoint = folder
        self._trigger("checkpoint")
        return folder

    def resume(self, folder: Path) -> None:
        saved = load_checkpoint(folder)
        check_settings(saved.settings, self.settings)
        self.network.load_state_dict(saved.adapters)
        self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.extra["scheduler"])
        if saved.extra.get("scaler"):
            self.scaler.load_state_dict(saved.extra["scaler"])
        self.position = saved.position
        self.info.step = self.position.step


def _grad_scaler(enabled: bool):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)
