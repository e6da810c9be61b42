"""The diffusion training maths as pure functions of the model's own noise schedule (alphas_cumprod).

With a = alphas_cumprod[t] (broadcast per sample):
    noisy  = sqrt(a) * x0 + sqrt(1 - a) * noise                (forward diffusion)
    target = noise                                             (epsilon prediction)
           = sqrt(a) * noise - sqrt(1 - a) * x0                (v prediction, Salimans & Ho 2022)
    SNR(t) = a / (1 - a)
Min-SNR-gamma weighting (Hang et al. 2023, arXiv:2303.09556; diffusers `compute_snr`):
    w = min(SNR, gamma) / SNR = min(1, gamma / SNR) for epsilon,  min(SNR, gamma) / (SNR + 1) for v;
    the epsilon form is written as min(1, gamma / SNR) so that SNR = 0 gives its limit 1, not 0 / 0.
Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
arXiv:2305.08891, Algorithm 1; https://arxiv.org/abs/2305.08891), on s = sqrt(alphas_cumprod) with first
value s_0 and last s_T:
    s' = (s - s_T) * s_0 / (s_0 - s_T),   alphas_cumprod' = s'^2
so the last step has a = 0 (SNR 0: pure noise), the first keeps its SNR, and the order of the steps is kept.
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
    """Per-sample loss weights [B] for Min-SNR-gamma; finite at SNR = 0 (a zero-terminal-SNR last step)."""
    ratio = snr(alpha_bar)
    if prediction == "v_prediction":
        return torch.clamp(ratio, max=gamma) / (ratio + 1)
    return torch.clamp(gamma / ratio, max=1.0)  # gamma / 0 = inf, clamped to the limit 1


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule shifted and scaled so its last step has SNR 0 and its first its old SNR (formula above).

    Computed in float64 and returned in the input's dtype; the last value is exactly 0.
    """
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = (root - last) * (first / (first - last))
    return (rescaled ** 2).to(alphas_cumprod.dtype)
