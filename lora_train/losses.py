"""The diffusion training maths as pure functions of the model's own noise schedule (alphas_cumprod).

With a = alphas_cumprod[t] (broadcast per sample):
    noisy  = sqrt(a) * x0 + sqrt(1 - a) * noise                (forward diffusion)
    target = noise                                             (epsilon prediction)
           = sqrt(a) * noise - sqrt(1 - a) * x0                (v prediction, Salimans & Ho 2022)
    SNR(t) = a / (1 - a)
Min-SNR-gamma weighting (Hang et al. 2023, arXiv:2303.09556; diffusers `compute_snr`):
    w = min(SNR, gamma) / SNR for epsilon,  min(SNR, gamma) / (SNR + 1) for v.
"""

from __future__ import annotations

import torch


def _per_sample(alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar.view(-1, 1, 1, 1)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a = _per_sample(alpha_bar)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def diffusion_target(latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
                     prediction: str) -> torch.Tensor:
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        a = _per_sample(alpha_bar)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"unknown prediction type {prediction!r}")


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar / (1 - alpha_bar)


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample loss weights [B] for Min-SNR-gamma."""
    ratio = snr(alpha_bar)
    clipped = torch.clamp(ratio, max=gamma)
    return clipped / (ratio + 1) if prediction == "v_prediction" else clipped / ratio
