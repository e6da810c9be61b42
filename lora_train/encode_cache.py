"""Latents and text-encoder outputs computed once and reused, so caching changes speed, never results.

A latent is one posterior sample of the VAE for one (image, flip), seeded by its key: the sha256 of the image
file's bytes, the bucket, the flip and a fingerprint of the VAE's weights. The uncached path calls the same
`encode` every step, so cached and uncached runs train on identical latents. On disk (for big sets) each latent
is `<key>.safetensors`: a changed image, bucket or VAE gives a new key, so a stale entry can never be read.
An image deleted or damaged after the dataset scan is left out of its batches with one warning.

Text-encoder outputs are cached per caption (and per sample size where the model conditions on it, as SDXL does)
when the text encoder is not trained; every caption is encoded alone in both paths, so the cache is exact too.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .images import DECODE_ERRORS
from .models import SizeInfo
from .models.conditioning import Cond
from .runtime import memory_bytes

logger = logging.getLogger(__name__)
Key = Tuple[int, bool]  # (sample index, flipped)


def module_fingerprint(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state dict."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(memory_bytes(tensor.detach().cpu().contiguous()))  # hashed in place, not copied
    return digest.hexdigest()


class LatentCache:
    """The latent of every (image, flip); kept in memory, in a folder, or (store=False) encoded on every call."""

    def __init__(self, model, dataset, store: bool = True, folder: Optional[Path] = None):
        self.model, self.dataset, self.store = model, dataset, store
        self.folder = Path(folder) if folder is not None else None
        self.vae_id = module_fingerprint(model.encoders()["vae"])
        self.hits = self.misses = 0
        self.unavailable: Dict[int, str] = {}  # sample index -> why it can no longer be read
        self._keys: Dict[Key, str] = {}
        self._memory: Dict[Key, torch.Tensor] = {}

    def key(self, index: int, flip: bool) -> str:
        if (index, flip) not in self._keys:
            sample = self.dataset.samples[index]
            digest = hashlib.sha256(Path(sample.path).read_bytes())
            digest.update(f"|{sample.bucket}|{flip}|{self.vae_id}".encode())
            self._keys[(index, flip)] = digest.hexdigest()
        return self._keys[(index, flip)]

    def encode(self, index: int, flip: bool) -> torch.Tensor:
        """One posterior sample, seeded by the key: the same tensor every time for the same inputs."""
        torch.manual_seed(int(self.key(index, flip)[:15], 16))
        pixels = self.dataset.load_pixels(index, flip).unsqueeze(0)
        return self.model.encode_images(pixels)[0].float()

    def latent(self, index: int, flip: bool) -> torch.Tensor:
        if not self.store:
            return self.encode(index, flip)
        if (index, flip) in self._memory:
            return self._memory[(index, flip)].to(self.model.device, non_blocking=True)
        path = self._path(index, flip)
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            self.hits += 1
            return load_file(str(path))["latent"].to(self.model.device)
        self.misses += 1
        latent = self.encode(index, flip)
        if path is None:
            self._memory[(index, flip)] = latent.cpu().pin_memory() if latent.is_cuda else latent
        else:
            _save_atomically(path, latent)
        return latent

    def batch(self, indices: List[int], flips: List[bool]) -> Tuple[List[int], Optional[torch.Tensor]]:
        """(positions kept, their latents stacked); an image that cannot be read any more is left out."""
        kept, latents = [], []
        for position, (index, flip) in enumerate(zip(indices, flips)):
            latent = self._readable_latent(index, flip)
            if latent is not None:
                kept.append(position)
                latents.append(latent)
        return kept, torch.stack(latents) if latents else None

    def _readable_latent(self, index: int, flip: bool) -> Optional[torch.Tensor]:
        if index in self.unavailable:
            return None
        try:
            return self.latent(index, flip)
        except DECODE_ERRORS as error:  # deleted, or changed into something that no longer decodes
            self.unavailable[index] = str(error)
            logger.warning("%s cannot be read any more (%s); it is skipped for the rest of the run",
                           self.dataset.samples[index].path, error)
            return None

    def fill(self, keys: List[Key], progress: Callable[[int], None]) -> None:
        """Makes sure every key is cached (encoding only what is missing); progress(done) after each."""
        for done, (index, flip) in enumerate(keys, 1):
            path = self._path(index, flip)
            if path is None or not path.is_file():
                self._readable_latent(index, flip)
            progress(done)

    def _path(self, index: int, flip: bool) -> Optional[Path]:
        return self.folder / f"{self.key(index, flip)}.safetensors" if self.folder else None


def _save_atomically(path: Path, latent: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    save_file({"latent": latent.detach().cpu().contiguous()}, str(temporary))
    temporary.replace(path)


class TextCache:
    """Text-encoder output per caption (no gradient), or (store=False) encoded on every call."""

    def __init__(self, model, store: bool):
        self.model, self.store = model, store
        self._memory: Dict[Tuple[str, Optional[SizeInfo]], Cond] = {}

    def _one(self, caption: str, size: SizeInfo) -> Cond:
        key = (caption, size if self.model.size_conditioned else None)
        if key in self._memory:
            return self._memory[key]
        with torch.no_grad():
            cond = self.model.encode_prompts([caption], [size])
        if self.store:
            self._memory[key] = cond
        return cond

    def fill(self, pairs: List[Tuple[str, SizeInfo]]) -> bool:
        """Encodes every (caption, size) once; True when all have one shape (batches then never need the encoder)."""
        return len({self._one(caption, size).shape for caption, size in pairs}) == 1

    def encode(self, captions: List[str], sizes: List[SizeInfo]) -> Cond:
        """Each caption encoded alone; a batch whose outputs differ in length (long prompts) is encoded together."""
        conds = [self._one(caption, size) for caption, size in zip(captions, sizes)]
        if len({cond.shape for cond in conds}) == 1:
            return Cond.cat(conds)
        with torch.no_grad():
            return self.model.encode_prompts(captions, sizes)
