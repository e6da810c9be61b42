"""LoRA adapters (Linear, Conv2d/LoCon, fused attention) named by kohya key stems, attached to a model without
changing it.

For a frozen base layer W the adapter adds a low-rank update:

    y = W(x) + up(down(dropout(x))) * (alpha / rank) * multiplier

`down` is kaiming-initialised and `up` is zero, so a fresh adapter changes nothing. Adapters never replace or
modify the modules they adapt: `LoRANetwork.attach()` registers one forward hook per Linear/Conv2d target, and on
a fused `nn.MultiheadAttention` (whose q/k/v/out are `FusedProjection` targets) an instance forward that applies
them inside the attention (fused_attention.py); it returns a handle whose `detach()` removes them all, leaving
the model bit-identical. The network's `state_dict()` is exactly
the tensors of a kohya-format file: `<stem>.lora_down.weight`, `<stem>.lora_up.weight`, `<stem>.alpha`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .fused_attention import FusedProjection, attach_fused_attention
from .layers import is_linear
from .targets import UNET_PREFIX, Target


def lora_delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense update the adapter adds to the base weight: (up @ down) * scale, in the base weight's shape.

    For a conv adapter down is [rank, in, kh, kw] and up is [out, rank, 1, 1]; the result is [out, in, kh, kw].
    """
    if down.dim() == 2:
        return (up @ down) * scale
    merged = up.flatten(1) @ down.flatten(1)
    return merged.reshape(up.shape[0], *down.shape[1:]) * scale


def _uniform_kaiming_(weight: torch.Tensor, generator: torch.Generator) -> None:
    """kaiming_uniform_(a=sqrt(5)) as nn.Linear uses, drawn from a private generator (any torch version)."""
    fan_in = weight[0].numel()
    bound = math.sqrt(6.0 / ((1 + 5) * fan_in))
    with torch.no_grad():
        weight.copy_(torch.empty(weight.shape).uniform_(-bound, bound, generator=generator))


class LoRAModule(nn.Module):
    """One adapter for one base Linear, Conv2d or fused-attention projection; forward(x) returns the update to add
    to the base output."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(f"grouped convolutions (groups={base.groups}) cannot take a LoRA adapter")
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
            self._conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        elif isinstance(base, FusedProjection) or is_linear(base):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
            self._conv_args = None
        else:
            raise TypeError(f"LoRA adapts Linear or Conv2d layers or a FusedProjection, not {type(base).__name__}")
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank = rank
        self.scale = float(alpha) / rank
        self.dropout = dropout
        _uniform_kaiming_(self.lora_down.weight, generator)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        # Explicit F.linear/F.conv2d: a host may monkeypatch nn.Linear.forward (the WebUI's Lora and casts do).
        down, up = self.lora_down.weight, self.lora_up.weight
        x = x.to(down.dtype) if not torch.is_autocast_enabled() else x
        x = F.dropout(x, self.dropout, self.training) if self.dropout else x
        if self._conv_args is None:
            return F.linear(F.linear(x, down), up) * (self.scale * multiplier)
        return F.conv2d(F.conv2d(x, down, **self._conv_args), up) * (self.scale * multiplier)

    def delta_weight(self) -> torch.Tensor:
        return lora_delta_weight(self.lora_down.weight, self.lora_up.weight, self.scale)


@dataclass
class NetworkSpec:
    """How adapters are sized: rank/alpha for Linear and 1x1 convs, conv_rank/conv_alpha for larger kernels."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    conv_rank: int = 0
    conv_alpha: float = 1.0
    seed: int = 0


def _is_wide_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


class AttachHandle:
    """Returned by LoRANetwork.attach(); detach() removes every hook and attention forward it added."""

    def __init__(self, hooks: List):  # each has remove(): a RemovableHandle or a FusedAttentionOverride
        self._hooks = hooks

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def attached(self) -> bool:
        return bool(self._hooks)


class LoRANetwork(nn.Module):
    """Adapters for a set of target modules, keyed by kohya stem (lora_unet_..., lora_te_...)."""

    def __init__(self, targets: Dict[str, Target], spec: NetworkSpec):
        super().__init__()
        generator = torch.Generator().manual_seed(spec.seed)
        adapters = {}
        for stem in sorted(targets):
            base = targets[stem]
            wide = _is_wide_conv(base)
            if wide and not spec.conv_rank:
                continue
            rank, alpha = (spec.conv_rank, spec.conv_alpha) if wide else (spec.rank, spec.alpha)
            adapters[stem] = LoRAModule(base, rank, alpha, spec.dropout, generator)
        if not adapters:
            raise ValueError("no module to adapt: the model has none of the expected layers")
        for stem, adapter in adapters.items():
            self.add_module(stem, adapter)  # state_dict keys are then the file's: <stem>.lora_down.weight
        self.spec = spec  # what the file's metadata records: the ranks and alphas these adapters were built with
        self.multiplier = 1.0
        self._targets = {stem: targets[stem] for stem in adapters}

    @property
    def adapters(self) -> Dict[str, LoRAModule]:
        return dict(self.named_children())

    def attach(self) -> AttachHandle:
        """Hooks every adapter onto its base module, the four of a fused attention onto the attention together;
        the base modules themselves are not changed."""
        hooks, fused = [], {}
        for stem, adapter in self.adapters.items():
            target = self._targets[stem]
            if isinstance(target, FusedProjection):
                fused.setdefault(target.attention, {})[target.part] = adapter
            else:
                hooks.append(target.register_forward_hook(self._hook(adapter)))
        handle = AttachHandle(hooks)
        try:
            for attention, adapters in fused.items():
                hooks.append(attach_fused_attention(attention, adapters, lambda: self.multiplier))
        except BaseException:
            handle.detach()
            raise
        return handle

    def _hook(self, adapter: LoRAModule):
        def add_update(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + adapter(inputs[0], self.multiplier).to(output.dtype)
        return add_update

    def text_encoder_stems(self) -> List[str]:
        """The stems of every text encoder's adapters (all but the UNet's `lora_unet_*`)."""
        return [stem for stem in self.adapters if not stem.startswith(UNET_PREFIX)]

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> List[Dict]:
        """Optimizer groups: the UNet's adapters (`lora_unet_*`) at unet_lr, every text encoder's at text_encoder_lr."""
        adapters, text_stems = self.adapters, set(self.text_encoder_stems())
        unet = [p for stem, a in adapters.items() if stem not in text_stems for p in a.parameters()]
        text = [p for stem, a in adapters.items() if stem in text_stems for p in a.parameters()]
        return [{"params": unet, "lr": unet_lr}, {"params": text, "lr": text_encoder_lr}]


def create_network(targets: Dict[str, Target], spec: NetworkSpec,
                   device: Optional[torch.device] = None) -> LoRANetwork:
    """Builds fp32 adapters for the targets, on device, without touching any global RNG."""
    with torch.random.fork_rng(devices=[]):
        network = LoRANetwork(targets, spec)
    return network.to(device=device, dtype=torch.float32) if device is not None else network
