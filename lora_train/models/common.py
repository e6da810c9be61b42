"""Context managers the model adapters share: freeze a model, checkpoint blocks, offload modules; each undoes
exactly what it did on exit."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


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


@contextlib.contextmanager
def offloaded(modules: List[nn.Module], device: torch.device) -> Iterator[None]:
    """Takes the modules' weights out of `device` memory for the duration; restores them bit for bit.

    From a GPU they go to the CPU. On the CPU they go to a temporary safetensors file (each Parameter and buffer
    object stays, holding an empty tensor meanwhile), so RAM holds only what training needs.
    """
    if not modules:
        yield
        return
    if torch.device(device).type != "cpu":
        places = [next(module.parameters()).device for module in modules]
        for module in modules:
            module.to("cpu")
        try:
            yield
        finally:
            for module, where in zip(modules, places):
                module.to(where)
        return
    with tempfile.TemporaryDirectory(prefix="lora-train-offload-") as folder:
        files = [_to_file(module, Path(folder) / f"{index}.safetensors") for index, module in enumerate(modules)]
        try:
            yield
        finally:
            for module, path in zip(modules, files):
                _from_file(module, path)


def _tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    named = {f"p.{name}": p for name, p in module.named_parameters()}
    named.update({f"b.{name}": b for name, b in module.named_buffers()})
    return named


def _to_file(module: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({name: t.detach().contiguous() for name, t in _tensors(module).items()}, str(path))
    with torch.no_grad():
        for tensor in _tensors(module).values():
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    return path


def _from_file(module: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    with torch.no_grad():
        for name, tensor in _tensors(module).items():
            tensor.data = saved[name]
