"""Which modules are Linear or Conv2d layers, judged by what they hold rather than by their class.

A WebUI may build its models from its own layer classes: Stable Diffusion WebUI Forge's Linear is a plain
`nn.Module` with `in_features`, `out_features`, `weight` and `bias` that casts its weights on the fly, not an
`nn.Linear` subclass (its Conv2d does subclass `nn.Conv2d`). Target discovery and the adapters use these checks,
so they find such layers and never replace their forward: a hook adds the update to what the layer computed.
"""

from __future__ import annotations

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a leaf module holding an [out_features, in_features] weight as a Linear does.

    A weight in a packed low-bit layout (another shape) is not a Linear weight an adapter can sit beside.
    """
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    features = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    return (all(isinstance(size, int) for size in features) and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == features and next(module.children(), None) is None)


def is_adaptable(module: nn.Module) -> bool:
    """A layer a LoRA adapter can be attached to: Linear-like or a 2-D convolution."""
    return is_linear(module) or isinstance(module, nn.Conv2d)
