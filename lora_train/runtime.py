"""How a run uses the machine, whatever the model: encoders offloaded while only their cached outputs are needed,
channels-last convolution weights, fp32 matmul precision, the autocast dtype, freed heap handed back, a tensor's
raw bytes.

Each context manager puts back exactly what it changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)
Layout = Tuple[torch.Size, Tuple[int, ...], torch.dtype]  # shape, strides, dtype of an offloaded tensor


@contextlib.contextmanager
def channels_last(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """4-D weights (convolutions) in channels-last memory order for the duration; same values, each put back.

    Convolution outputs follow their weights' order, so the activations go channels-last too. Weights that were
    channels-last already (the WebUI's --opt-channelslast) are left as they are.
    """
    moved = [t for t in [*module.parameters(), *module.buffers()]
             if enabled and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last)]
    try:
        with torch.no_grad():
            for tensor in moved:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
        yield
    finally:
        with torch.no_grad():
            for tensor in moved:
                tensor.data = tensor.data.contiguous()


@contextlib.contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision for the duration ("default": left as it is); the process's setting
    (and TF32 flag) put back."""
    if precision == "default":
        yield
        return
    saved, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)
        torch.backends.cuda.matmul.allow_tf32 = tf32


class Offloader:
    """Takes modules' weights out of `device` memory and puts them back bit for bit (a context manager).

    From a GPU they go to the CPU. On the CPU their bytes are streamed to a temporary file (each Parameter and
    buffer object stays, holding an empty tensor meanwhile), so RAM holds only what training needs. If they
    cannot go (a full disk, no free RAM), they stay where they are and training goes on. `suspended()` brings
    them back for a moment, e.g. for a preview image that needs the VAE and text encoder.
    """

    def __init__(self, modules: List[nn.Module], device: torch.device):
        self.modules, self.device = modules, torch.device(device)
        self._places: List[torch.device] = []
        self._folder: Optional[tempfile.TemporaryDirectory] = None
        self._layouts: List[List[Layout]] = []

    def __enter__(self) -> "Offloader":
        self.offload()
        return self

    def __exit__(self, *_exc) -> None:
        self.restore()

    @property
    def away(self) -> bool:
        return bool(self._places) or self._folder is not None

    def offload(self) -> None:
        if self.away or not self.modules:
            return
        try:
            self._move_out()
        except (OSError, RuntimeError) as error:  # a full disk, no free RAM: training goes on with them in place
            logger.warning("the VAE and text encoder stay where they are: they could not be moved out (%s)", error)
            self.restore()

    def _move_out(self) -> None:
        if self.device.type != "cpu":
            self._places = [next(module.parameters()).device for module in self.modules]
            for module in self.modules:
                module.to("cpu")
            return
        self._folder = tempfile.TemporaryDirectory(prefix="lora-train-offload-")
        for index, module in enumerate(self.modules):  # a module is emptied only once all of it is written
            self._layouts.append(_to_file(module, Path(self._folder.name) / f"{index}.bin"))

    def restore(self) -> None:
        if self._places:
            for module, where in zip(self.modules, self._places):
                module.to(where)
            self._places = []
        if self._folder is not None:
            release_freed_memory()  # training's freed activations, so they and the weights never add up
            for index, (module, layout) in enumerate(zip(self.modules, self._layouts)):
                _from_file(module, Path(self._folder.name) / f"{index}.bin", layout)
            self._folder.cleanup()
            self._folder, self._layouts = None, []

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        was_away = self.away
        self.restore()
        try:
            yield
        finally:
            if was_away:
                self.offload()


def _tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    named = {f"p.{name}": p for name, p in module.named_parameters()}
    named.update({f"b.{name}": b for name, b in module.named_buffers()})
    return named


def release_freed_memory() -> None:
    """Gives freed heap pages back to the OS (glibc's malloc_trim); a no-op where there is no glibc."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _to_file(module: nn.Module, path: Path) -> List[Layout]:
    """Streams each weight's bytes to `path` (no second copy in RAM), then frees it; returns each one's layout."""
    tensors = list(_tensors(module).values())
    dense = [t.detach() if memory_bytes(t.detach()) is not None else t.detach().contiguous() for t in tensors]
    with open(path, "wb") as file:
        for tensor in dense:
            file.write(memory_bytes(tensor))
    layouts = [(t.shape, t.stride(), t.dtype) for t in dense]
    with torch.no_grad():
        for tensor in tensors:
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    return layouts


def _from_file(module: nn.Module, path: Path, layouts: List[Layout]) -> None:
    with open(path, "rb") as file, torch.no_grad():
        for tensor, (shape, stride, dtype) in zip(_tensors(module).values(), layouts):
            restored = torch.empty_strided(shape, stride, dtype=dtype)  # channels-last weights come back so
            if file.readinto(memory_bytes(restored)) != restored.numel() * restored.element_size():
                raise OSError(f"offloaded weights in {path} are truncated; the model was not restored")
            tensor.data = restored


def memory_bytes(tensor: torch.Tensor):
    """The tensor's memory, in memory order, as a writable numpy uint8 array (no copy; any dtype, bf16 too);
    None when it is not one dense block (contiguous, channels-last or any other dense order)."""
    order = sorted(range(tensor.dim()), key=tensor.stride, reverse=True)
    dense = tensor.permute(order)
    return dense.reshape(-1).view(torch.uint8).numpy() if dense.is_contiguous() else None


def autocast_dtype(mixed_precision: str, device: torch.device) -> Optional[torch.dtype]:
    """fp16/bf16 autocast on a GPU; the CPU trains in fp32 (its half-precision kernels are slow or missing)."""
    if device.type != "cuda" or mixed_precision == "no":
        return None
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16
