"""What the model adapters share: empty modules to load weights into, the SD noise schedule, where a held model
runs, a frozen base, its own checkpointing switched off, checkpointed blocks; each context manager undoes exactly
what it did on exit."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ModelLoadError

# The UNets' own checkpoint switches (BasicTransformerBlock.checkpoint, ResBlock/UNet use_checkpoint), turned off
# for training: ldm's reentrant checkpoint only differentiates a block's own parameters (adapters inside it would
# get no gradient) and Forge's raises NotImplementedError; `checkpointed` is the replacement.
CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint")


def empty_module(cls, **config) -> nn.Module:
    """The module with its weights on the meta device: no memory, no random init, until weights are assigned."""
    with torch.device("meta"):
        return cls(**config)


def load_weights(module: nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """Loads by taking the checkpoint's tensors as the weights (no second copy of the model in memory).

    Raises:
        ModelLoadError: the tensors do not fit the module (names or shapes).
    """
    try:
        module.load_state_dict(state_dict, assign=True)
    except RuntimeError as error:
        raise ModelLoadError(f"the checkpoint's {what} does not match its config ({str(error)[:300]}); "
                             "put the model's own .yaml beside it with the same name") from None


def scaled_linear_alphas_cumprod(start: float = 0.00085, end: float = 0.012, steps: int = 1000) -> torch.Tensor:
    """alpha_bar_t of SD's DDPM schedule: betas linear in sqrt between start and end (SD1/SD2/SDXL defaults)."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


class HeldModelAdapter:
    """What the adapters of a model a host holds share (`unet`, `_device` set by the adapter): where its UNet
    computes, in which dtype, and its part of the protocol that only the CLI's model does otherwise.

    A host that moves modules in on call (the WebUI's --medvram) passes the device; else it is where the UNet is.
    """

    unet: nn.Module
    _device: Optional[torch.device] = None
    relayout = True  # the run may give the UNet's convolution weights channels-last order, and put them back

    def load_unet(self) -> None:
        """Nothing: a held model's UNet is in memory."""

    def release_encoders(self, offloader) -> None:
        """The offloaded encoders back at once: the host generates with them next."""
        offloader.restore()

    @property
    def device(self) -> torch.device:
        return self._device or next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def checkpoint_blocks(unet: nn.Module) -> List[nn.Module]:
    """The blocks of an ldm/sgm UNet that activation checkpointing wraps, in forward order."""
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


@contextlib.contextmanager
def switched_off(model: nn.Module, flags: Sequence[str]) -> Iterator[None]:
    """Sets every boolean attribute named in `flags` that is True on a module of the model to False for the
    duration (a model's own gradient checkpointing); each restored afterwards."""
    saved = [(m, name) for m in model.modules() for name in flags if getattr(m, name, None) is True]
    try:
        for module, name in saved:
            setattr(module, name, False)
        yield
    finally:
        for module, name in saved:
            setattr(module, name, True)


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


def _checkpointed_forward(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
