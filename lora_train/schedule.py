"""The noise schedule a run trains on: the model's own prediction and alphas_cumprod, as the config adjusts them.

This is the one place that decides them. `model.prediction: auto` keeps what the checkpoint says
(`DiffusionModel.prediction`); an explicit value overrides it (a v-prediction file that lacks the marker).
`training.zero_terminal_snr` rescales the model's own alphas_cumprod (`losses.rescale_zero_terminal_snr`). The
trainer trains on the result, the LoRA file's metadata and a resumable checkpoint's settings record it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig, check_zero_terminal_snr
from .losses import rescale_zero_terminal_snr


@dataclass(frozen=True)
class NoiseSchedule:
    prediction: str  # "epsilon" | "v_prediction": what the UNet is trained to output
    alphas_cumprod: torch.Tensor  # fp32 [num_train_timesteps], zero_terminal_snr applied
    zero_terminal_snr: bool


def effective_schedule(model, config: TrainConfig) -> NoiseSchedule:
    """The schedule for training `model` (a DiffusionModel) as configured.

    Raises:
        ConfigError: zero_terminal_snr with a model that (as configured) predicts epsilon.
    """
    chosen = config.model.prediction
    prediction = model.prediction if chosen == "auto" else chosen
    zero_terminal_snr = config.training.zero_terminal_snr
    check_zero_terminal_snr(zero_terminal_snr, prediction)
    alphas_cumprod = model.alphas_cumprod
    if zero_terminal_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    return NoiseSchedule(prediction, alphas_cumprod, zero_terminal_snr)
