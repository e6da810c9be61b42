"""What the model adapters share: empty modules to load weights into, a frozen base, checkpointed blocks; each
context manager undoes exactly what it did on exit."""

from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# The UNets' own checkpoint switches: BasicTransformerBlock.checkpoint, ResBlock/UNet use_checkpoint.
CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint")


def empty_module(cls, **config) -> nn.Module:
    """The module with its weights on the meta device: no memory, no random init, until weights are assigned."""
    with torch.device("meta"):
        return cls(**config)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """requires_grad=False on every parameter for the duration; each flag restored afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in saved:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in saved:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def checkpointed(blocks: List[nn.Module]) -> Iterator[None]:
    """Runs each block under non-reentrant activation checkpointing; restores any instance forward after."""
    saved = [(block, block.__dict__.get("forward")) for block in blocks]
    try:
        for block, _ in saved:
            block.forward = _checkpointed_forward(block.forward)
        yield
    finally:
        for block, previous in saved:
            del block.forward
            if previous is not None:
                block.forward = previous


def compvis_blocks(unet: nn.Module) -> List[nn.Module]:
    """The blocks of a compvis-layout UNet (ldm, sgm, Forge) that `checkpointed` wraps."""
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


@contextlib.contextmanager
def checkpoint_flags_off(unet: nn.Module) -> Iterator[None]:
    """The UNet's own checkpoint switches (BasicTransformerBlock.checkpoint, ResBlock/UNet use_checkpoint) off.

    ldm's reentrant checkpoint only differentiates a block's own parameters (adapters inside it would get no
    gradient); Forge's raises NotImplementedError. `checkpointed` is the replacement.
    """
    saved = [(m, name, getattr(m, name)) for m in unet.modules() for name in CHECKPOINT_FLAGS
             if isinstance(getattr(m, name, None), bool) and getattr(m, name)]
    try:
        for module, name, _ in saved:
            setattr(module, name, False)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _checkpointed_forward(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
