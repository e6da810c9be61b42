"""Optimizers and learning-rate schedules for the adapters.

Schedules are pure functions of the step (the multiplier of the base lr), as `transformers.get_scheduler`
defines them, wrapped in a `LambdaLR` so their state resumes exactly. Optional optimizers come from their own
packages and raise ImportError with the pip command when missing.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List

import torch


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, cycles: int = 1) -> float:
    """Multiplier of the base learning rate at `step` (0-based), after a linear warm-up of warmup_steps.

    constant: 1 (no warm-up even if warmup_steps is set, as in transformers); constant_with_warmup: ramp then 1;
    linear: ramp then linear to 0 at total_steps; cosine: ramp then 0.5 * (1 + cos(pi * progress));
    cosine_with_restarts: `cycles` cosine decays, each restarting at 1.
    """
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    factor = functools.partial(lr_factor, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(name: str, groups: List[Dict]) -> torch.optim.Optimizer:
    """AdamW, AdamW8bit (bitsandbytes), Prodigy (prodigyopt) or Lion (lion-pytorch) over param groups."""
    groups = [g for g in groups if g["params"]]
    if name == "AdamW":
        return torch.optim.AdamW(groups, weight_decay=1e-2)
    if name == "AdamW8bit":
        bnb = _import("bitsandbytes", "bitsandbytes", name)
        return bnb.optim.AdamW8bit(groups, weight_decay=1e-2)
    if name == "Prodigy":
        prodigy = _import("prodigyopt", "prodigyopt", name)
        return prodigy.Prodigy(groups, weight_decay=1e-2)
    if name == "Lion":
        lion = _import("lion_pytorch", "lion-pytorch", name)
        return lion.Lion(groups, weight_decay=1e-2)
    raise ValueError(f"unknown optimizer {name!r}")


def _import(module: str, package: str, optimizer: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"training.optimizer {optimizer} needs the package {package}: "
                          f"pip install {package} (or use optimizer: AdamW)") from None
