"""A .safetensors checkpoint read one tensor at a time, each cast at once to the dtype the model will run in.

`safetensors.torch.load_file` maps the whole file and its tensors share that one mapping, so a model cast after
loading holds the file's copy and the cast copy together (an fp16 SD1.5 in fp32: 2 GiB beside 4 GiB). Here each
tensor is read with a plain read into its own buffer, cast and placed, and that buffer is freed before the next
one; the file is never mapped, so what stays in memory is only the weights a model keeps. It reads like the
state dict (`keys`, `[key]`, `get`, `pop`), so the converters that take a state dict take it unchanged; `shape(key)`
answers from the header without reading.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

from . import ModelLoadError
from ..runtime import memory_bytes

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
HEADER_LIMIT = 100 * 1024 ** 2  # a header larger than this is a damaged length field, not a checkpoint


class SafetensorsFile(Mapping):
    """The tensors of one file by name, read on access: floating-point ones cast to `dtype` (None: as stored)
    and placed on `device`. `pop` reads a tensor and leaves it out of later `keys()`."""

    def __init__(self, path: Path, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        self.path, self.dtype, self.device = Path(path), dtype, device
        self._entries, self._data_start = read_header(self.path)
        self._taken: set = set()

    def __iter__(self) -> Iterator[str]:
        return (key for key in self._entries if key not in self._taken)

    def __len__(self) -> int:
        return len(self._entries) - len(self._taken)

    def __contains__(self, key: object) -> bool:
        return key in self._entries and key not in self._taken

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._entries[key]["shape"])

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self:
            raise KeyError(key)
        tensor = self.read_stored(key)
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.device, dtype=dtype)

    def read_stored(self, key: str) -> torch.Tensor:
        """The tensor as the file stores it, in a buffer of its own."""
        entry = self._entries[key]
        tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        with open(self.path, "rb") as file:
            file.seek(self._data_start + start)
            if tensor.numel() and file.readinto(memory_bytes(tensor)) != end - start:
                raise ModelLoadError(f"{self.path.name} is truncated (at {key}); re-download it")
        return tensor

    def pop(self, key: str, *default):
        if key not in self and default:
            return default[0]
        tensor = self[key]
        self._taken.add(key)
        return tensor


def read_header(path: Path) -> Tuple[Dict[str, dict], int]:
    """({name: {dtype, shape, data_offsets}}, where the data starts), checked against the file's size.

    Raises:
        ModelLoadError: not a safetensors file, or a damaged or truncated one.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > min(HEADER_LIMIT, size - 8):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(file.read(length))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            count = torch.Size(entry["shape"]).numel()
            if end - start != count * DTYPES[entry["dtype"]].itemsize or 8 + length + end > size:
                raise ValueError(f"{name}'s bytes do not fit its shape or the file")
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path.name} cannot be read as safetensors ({error}); re-download it") from None
    return header, 8 + length
