"""Memory preflight: will these settings fit, and if not, which settings to change.

The peak of a LoRA step is estimated from the model and the largest bucket:

    peak = frozen weights on the device (UNet, plus VAE and text encoder unless their outputs are cached)
         + adapters: parameters, gradients and two AdamW moments, fp32 (4 copies x 4 bytes per parameter)
         + activations: bytes autograd saves per latent pixel (measured by one small probe forward of the UNet)
                        x latent pixels x batch size (/ blocks with gradient checkpointing)
         + a fixed allowance for the framework (CUDA context and workspace)

With SDPA attention the saved activations grow linearly with the latent area, which is what the probe scales.
`advise` tries the usual remedies in order (gradient checkpointing, caching so the encoders are offloaded,
smaller batches, a lower resolution) and returns the first set of changes that fits the budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .models import SizeInfo

GIB = 1024 ** 3
FRAMEWORK_BYTES = GIB // 2  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
PROBE_LATENT = 8  # the smallest latent side an SD UNet takes (three 2x downsamples)
CHECKPOINT_FACTOR = 4  # with checkpointing, ~a few blocks' activations are live at once, not all of them


class MemoryPreflightError(ValueError):
    """The settings will not fit the device's memory; `changes` would make them fit (empty if nothing does)."""

    def __init__(self, message: str, changes: Dict[str, object]):
        super().__init__(message)
        self.changes = changes


@dataclass
class MemoryEstimate:
    weights: int
    adapters: int
    activations: int
    framework: int = FRAMEWORK_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.activations + self.framework

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.2f}"
                          for name in ("weights", "adapters", "activations", "framework"))
        return f"{self.total / GIB:.2f} GiB ({parts})"


@dataclass
class Preflight:
    fits: bool
    estimate: MemoryEstimate
    budget: int
    changes: Dict[str, object] = field(default_factory=dict)  # "training.batch_size" -> value that fits

    def message(self) -> str:
        head = (f"estimated peak memory {self.estimate.describe()} vs {self.budget / GIB:.2f} GiB free")
        if self.fits:
            return head + ": fits"
        if not self.changes:
            return head + ": does not fit even at batch size 1 and the lowest resolution; use a larger GPU"
        return head + f": does not fit; set {changes_text(self.changes)}"


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def activation_bytes_per_pixel(model) -> float:
    """Bytes autograd saves per latent pixel per sample in one UNet forward (one probe at 8x8 latents)."""
    saved: Dict[Tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    device = model.device
    with torch.no_grad():
        cond = model.encode_prompts([""], [SizeInfo.square(PROBE_LATENT * 8)])
    noisy = torch.zeros(1, 4, PROBE_LATENT, PROBE_LATENT, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.predict(noisy, torch.tensor([500], device=device), cond)
    return sum(saved.values()) / PROBE_LATENT ** 2


def estimate_memory(model, config, bucket: Tuple[int, int], adapter_parameters: int,
                    per_pixel: float) -> MemoryEstimate:
    """The peak for `config` at the largest bucket (width, height) in pixels; see the module docstring."""
    train = config.training
    encoders = model.encoders()
    offloaded = train.cache_latents and train.cache_text_encoder_outputs and not config.model.train_text_encoder
    weights = _bytes(model.unet) + (0 if offloaded else sum(_bytes(m) for m in encoders.values()))
    pixels = (bucket[0] // 8) * (bucket[1] // 8) * train.batch_size
    activations = per_pixel * pixels
    if train.gradient_checkpointing:
        activations /= CHECKPOINT_FACTOR
    return MemoryEstimate(weights=weights, adapters=16 * adapter_parameters, activations=int(activations))


def _remedies(config) -> List[Tuple[str, object]]:
    """Single changes, in the order they cost the user least."""
    train, steps = config.training, []
    if not train.gradient_checkpointing:
        steps.append(("training.gradient_checkpointing", True))
    if not train.cache_latents:
        steps.append(("training.cache_latents", True))
    size = train.batch_size
    while size > 1:
        size //= 2
        steps.append(("training.batch_size", size))
    resolution = config.data.resolution
    while resolution > 256:
        resolution -= 128
        steps.append(("data.resolution", resolution))
    return steps


def remedies(config, count: int = 3) -> Dict[str, object]:
    """The first `count` remedies together, for when no estimate says which is enough (a mid-run OOM)."""
    return dict(_remedies(config)[:count])


def changes_text(changes: Dict[str, object]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in changes.items())


def apply_changes(config, changes: Dict[str, object]):
    """A copy of config with {"section.key": value} applied."""
    changed = copy.deepcopy(config)
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(changed, section), name, value)
    return changed


def preflight(model, config, bucket: Tuple[int, int], adapter_parameters: int, budget: int,
              per_pixel: Optional[float] = None) -> Preflight:
    """Whether config fits `budget` bytes; if not, the cumulative changes (from `_remedies`) that make it fit."""
    per_pixel = activation_bytes_per_pixel(model) if per_pixel is None else per_pixel

    def estimate(candidate) -> MemoryEstimate:
        scale = candidate.data.resolution / config.data.resolution
        size = (int(bucket[0] * scale) // 8 * 8, int(bucket[1] * scale) // 8 * 8)
        return estimate_memory(model, candidate, size, adapter_parameters, per_pixel)
    first = estimate(config)
    if first.total <= budget:
        return Preflight(True, first, budget)
    changes: Dict[str, object] = {}
    for key, value in _remedies(config):
        changes[key] = value
        if estimate(apply_changes(config, changes)).total <= budget:
            return Preflight(False, first, budget, dict(changes))
    return Preflight(False, first, budget)


def check_device_memory(model, config, bucket: Tuple[int, int], adapter_parameters: int) -> Optional[Preflight]:
    """On a GPU: raises MemoryPreflightError when the settings cannot fit its free memory. Nothing on the CPU."""
    device = torch.device(model.device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    result = preflight(model, config, bucket, adapter_parameters, free + torch.cuda.memory_allocated(device))
    if not result.fits:
        raise MemoryPreflightError(result.message(), result.changes)
    return result
