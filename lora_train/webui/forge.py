"""Stable Diffusion WebUI Forge as a `Host`: its engine, memory manager and built-in LoRA loader (sd_forge_lora).

Forge keeps A1111's shell (shared.state, the queue lock, the progress API, processing, the Lora folder), so
`ForgeHost` is `A1111Host` with what Forge changed: the model loads lazily (a placeholder until the first
generation) and is an engine with `forge_objects`; a `<lora:...>` generation leaves the LoRA merged into the
shared weights until a later generation without it; LoRA files are cached by path (an lru_cache in
`networks`), by the engine's `current_lora_hash`, by each LoraLoader's `loaded_hash` and in the prompt
conditioning cache; the memory manager decides where modules live. Facts measured in a running Forge are in
DESIGN.md §4 and the Forge harness README. Imports Forge's `modules`/`backend` inside functions only.

Forge Neo: its `networks` has no file cache and no `load_lora_state_dict`; the steps that need what is absent
are skipped (getattr), and a missing loader function gives a HostError, never a traceback.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, List, Optional

from ..models import DiffusionModel
from .a1111 import A1111Host, _networks
from .host import HostError, Verification

NO_LORAS = str([])  # the engine's and LoraLoader's hash of "no LoRA applied"


def is_forge() -> bool:
    """Whether this process runs Forge (its `modules_forge` package is importable)."""
    import importlib.util

    return importlib.util.find_spec("modules_forge") is not None


class ForgeHost(A1111Host):
    """What a job needs from a running Forge."""

    def check_trainable(self) -> None:
        """The loaded engine is checked now; a model Forge has not loaded yet is loaded and checked by the job."""
        if self.engine_loaded():
            self._adapted()

    def engine_loaded(self) -> bool:
        return hasattr(self.shared().sd_model, "forge_objects")

    def load_engine(self):
        """The engine, loading the selected checkpoint as Forge's processing does; the caller holds the lock."""
        if not self.engine_loaded():
            from modules import sd_models
            from modules_forge import main_entry

            if not sd_models.model_data.forge_loading_parameters:
                main_entry.refresh_model_loading_parameters()
            try:
                sd_models.forge_model_reload()
            except ValueError as error:  # "You do not have any model!"
                raise HostError(f"Forge could not load a checkpoint ({error}); pick one at the top of the page")
        return self.sd_model()

    def compute_device(self):
        """The device Forge's memory manager computes on."""
        from backend import memory_management

        return memory_management.get_torch_device()

    def training_model(self) -> DiffusionModel:
        """The engine with no LoRA merged, its UNet, text encoder and VAE placed by Forge's memory manager."""
        from backend import memory_management

        engine = self.load_engine()
        model = self._adapted()
        self.restore_base_weights()
        objects = engine.forge_objects
        memory_management.load_models_gpu([objects.unet, objects.clip.patcher, objects.vae.patcher])
        return model

    def restore_base_weights(self) -> None:
        """Unmerges any LoRA (each LoraLoader restores its backup) and makes Forge re-apply on the next prompt."""
        engine = self.sd_model()
        original = engine.forge_objects_original
        original.unet.refresh_loras()
        original.clip.patcher.refresh_loras()
        engine.forge_objects.unet, engine.forge_objects.clip = original.unet, original.clip
        engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
        engine.current_lora_hash = NO_LORAS

    @contextlib.contextmanager
    def exclusive(self, job: str, task_id: Optional[str] = None) -> Iterator[None]:
        """A1111's bracket; afterwards no conditioning computed during the job (previews) is reused."""
        with super().exclusive(job, task_id):
            try:
                yield
            finally:
                self.clear_cond_cache()

    def clear_cond_cache(self) -> None:
        from modules import processing

        processing.StableDiffusionProcessing.cached_c = [None, None, None]
        processing.StableDiffusionProcessing.cached_uc = [None, None, None]

    def after_save(self, path: Path) -> Verification:
        """Verified with Forge's loader; then every cache that would serve an older file of that name is dropped."""
        verification = self.verify_lora(path)
        networks = _networks()
        cached = getattr(networks, "load_lora_state_dict", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
        if self.engine_loaded():
            self.restore_base_weights()
        self.clear_cond_cache()
        self.refresh_loras()
        return verification

    def verify_lora(self, path: Path) -> Verification:
        """Matches the file's keys to the UNet and text encoder with Forge's own key maps and loader."""
        try:
            from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
        except ImportError:
            raise HostError("this Forge has no backend.patcher.lora loader, so the file cannot be checked; "
                            "try it with <lora:name:1> in a prompt") from None
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        objects = self.sd_model().forge_objects_original
        unet_patches, rest = load_lora(tensors, model_lora_keys_unet(objects.unet.model, {}))
        clip_patches, rest = load_lora(rest, model_lora_keys_clip(objects.clip.cond_stage_model, {}))
        placed = _placed_keys(objects.unet, unet_patches, path) + _placed_keys(objects.clip.patcher, clip_patches, path)
        skipped = [key for key in [*unet_patches, *clip_patches] if key not in placed]
        unmatched = sorted({key.split(".", 1)[0] for key in rest} | {str(key) for key in skipped})
        stems = {key.split(".", 1)[0] for key in tensors}
        return Verification(stems=len(stems), matched=len(placed), unmatched=unmatched)


def _placed_keys(patcher, patches: dict, path: Path) -> List:
    """The patch keys Forge would apply: add_patches on a clone, so the live patcher is not changed."""
    return list(patcher.clone().add_patches(filename=str(path), patches=patches, strength_patch=1.0))
