"""The AUTOMATIC1111 WebUI (1.10) as a `Host`: the loaded checkpoint, the queue lock, progress, the Lora folder,
generation, and the built-in Lora extension (undo its merged weights, verify and list a new file).

Imports the WebUI's `modules` inside functions only, so importing it costs nothing at WebUI start-up. Facts it
relies on are in DESIGN.md §4: the built-in Lora extension leaves the last LoRA merged into the weights until a
later generation, so training first restores the checkpoint's weights through the built-in's own functions; the
queue lock is held for the whole job; the model is trained in place and the adapter's `training()` plus the
network's detach give it back as it was.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Iterator, Optional, Set

from ..models import DiffusionModel, HeldModel, ModelLoadError
from ..models.adapters import adapt
from .host import PREVIEW_SAMPLER, CheckpointFacts, HostError, Verification

JOB_FIELDS = ("job", "job_count", "job_no", "sampling_step", "sampling_steps", "textinfo")


def _networks():
    """The built-in Lora extension's `networks` module (loaded by the WebUI under that top-level name)."""
    return sys.modules.get("networks")


class A1111Host:
    """What a job needs from a running AUTOMATIC1111 WebUI."""

    _stopping = False  # stop_generation set the Interrupt flag for the image being generated
    _interrupted_before_stop = False

    @staticmethod
    def shared():
        from modules import shared

        return shared

    def sd_model(self):
        model = self.shared().sd_model
        if model is None:
            raise HostError("no checkpoint is loaded; pick one in the checkpoint list at the top of the page")
        return model

    def check_trainable(self) -> None:
        self._adapted()
        if getattr(self.shared().cmd_opts, "lowvram", False):
            raise HostError("training cannot run with --lowvram (it moves the model layer by layer); restart "
                            "the WebUI without it, or with --medvram")

    def compute_device(self):
        """Where the WebUI runs the model (with --medvram not where its weights sit between calls)."""
        from modules import devices

        return devices.device

    def _adapted(self) -> DiffusionModel:
        held = HeldModel(name=self.checkpoint_name(), device=self.compute_device(),
                         clip_skip=int(getattr(self.shared().opts, "CLIP_stop_at_last_layers", 1) or 1))
        try:
            return adapt(self.sd_model(), held)
        except ModelLoadError as error:
            raise HostError(str(error)) from None

    def lora_dir(self) -> Path:
        return Path(self.shared().cmd_opts.lora_dir)

    def work_dir(self, name: str) -> Path:
        """Logs, checkpoints and previews: outside the Lora folder, whose every .safetensors is listed."""
        from modules import paths_internal

        root = getattr(self.shared().cmd_opts, "lora_train_work_dir", None)
        return Path(root or Path(paths_internal.default_output_dir) / "lora-train") / name

    def presets_dir(self) -> Path:
        """Saved setting presets, in the WebUI's data folder so extension updates keep them."""
        from modules import paths_internal

        return Path(paths_internal.data_path) / "lora-train-presets"

    def checkpoint_name(self) -> str:
        info = getattr(self.sd_model(), "sd_checkpoint_info", None)
        return getattr(info, "name_for_extra", None) or getattr(info, "title", "") or "loaded checkpoint"

    def checkpoint_facts(self) -> CheckpointFacts:
        """The family as the adapter table tells it; the metadata is the CheckpointInfo's (read from the file)."""
        model = self.sd_model()
        try:
            family = self._adapted().family
        except HostError:  # a model this extension does not train
            family = None
        metadata = getattr(getattr(model, "sd_checkpoint_info", None), "metadata", None) or {}
        return CheckpointFacts(self.checkpoint_name(), family, {str(k): str(v) for k, v in metadata.items()})

    @contextlib.contextmanager
    def exclusive(self, job: str, task_id: Optional[str] = None) -> Iterator[None]:
        """Holds the WebUI's queue lock and brackets shared.state, as the WebUI's own GPU calls do.

        With a task id ("task(...)" from the page), the WebUI's progress API reports the job under it, so
        the page's own progress bar follows it, across page reloads too. The job's random draws (previews,
        the built-in loader's layer init in verify_lora) leave the WebUI's RNG state as it was.
        """
        import torch
        from modules import call_queue, progress

        state = self.shared().state
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        if task_id:
            progress.add_task_to_queue(task_id)
        with call_queue.queue_lock, torch.random.fork_rng(devices=cuda):
            state.begin(job=job)
            if task_id:
                progress.start_task(task_id)
            try:
                yield
            finally:
                if task_id:
                    progress.finish_task(task_id)
                state.end()

    def end_task(self, task_id: Optional[str]) -> None:
        """Marks the task finished in the WebUI's progress API, which tells the page's bar to go."""
        from modules import progress

        if task_id:
            progress.finish_task(task_id)

    def training_model(self) -> DiffusionModel:
        """The loaded checkpoint as a DiffusionModel, with the built-in Lora's merged weights undone."""
        self.check_trainable()
        self.restore_base_weights()
        return self._adapted()

    def restore_base_weights(self) -> None:
        """Makes the weights equal the checkpoint's again and stops the built-in Lora re-applying any LoRA."""
        import torch

        networks = _networks()
        if networks is None:
            return
        with torch.no_grad():
            networks.loaded_networks.clear()
            for module in self.sd_model().modules():
                if hasattr(module, "network_layer_name"):
                    networks.network_restore_weights_from_backup(module)
                    networks.network_reset_cached_weight(module)

    def report(self, step: int, total: int, text: str) -> None:
        """Progress for the WebUI's own progress bar (/internal/progress reads job_no / job_count)."""
        state = self.shared().state
        state.job_count, state.job_no, state.sampling_step, state.sampling_steps = total, step, 0, 0
        state.textinfo = text

    def interrupted(self) -> bool:
        return bool(self.shared().state.interrupted)

    def show_image(self, image) -> None:
        self.shared().state.assign_current_image(image)

    def generate(self, prompt: str, seed: int, steps: int = 20, width: int = 512, height: int = 512,
                 negative_prompt: str = "", cfg_scale: float = 7.0, sampler: str = PREVIEW_SAMPLER):
        """One image from the WebUI's own txt2img pipeline and sampler; the caller holds the queue lock.

        The progress fields and the Interrupt flag are put back afterwards: an Interrupt the user pressed
        during the image stays set (the job stops on it), one from `stop_generation` does not.
        """
        from modules import processing

        state = self.shared().state
        saved = {name: getattr(state, name) for name in JOB_FIELDS}
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=self.sd_model(), prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
            width=width, height=height, cfg_scale=cfg_scale, sampler_name=sampler, do_not_save_samples=True,
            do_not_save_grid=True)
        try:
            with contextlib.closing(p):
                images = processing.process_images(p).images
            return images[0] if images else None  # interrupted before the first image
        finally:
            for name, value in saved.items():
                setattr(state, name, value)
            if self._stopping:
                state.interrupted, self._stopping = self._interrupted_before_stop, False

    def stop_generation(self) -> None:
        """The sampler checks shared.state.interrupted at every step, as for the page's Interrupt button."""
        state = self.shared().state
        if not self._stopping:
            self._interrupted_before_stop, self._stopping = bool(state.interrupted), True
        state.interrupted = True

    def after_save(self, path: Path) -> Verification:
        """A new LoRA file: checked with the WebUI's own loader, listed, and no stale conditioning left to reuse."""
        verification = self.verify_lora(path)
        self.refresh_loras()
        self.clear_cond_cache()
        return verification

    def clear_cond_cache(self) -> None:
        """Drops the conditioning the WebUI may reuse between generations (it predates the new LoRA)."""
        from modules import processing

        processing.StableDiffusionProcessing.cached_c = [None, None]
        processing.StableDiffusionProcessing.cached_uc = [None, None]

    def refresh_loras(self) -> None:
        networks = _networks()
        if networks is not None:
            networks.list_available_networks()

    def verify_lora(self, path: Path) -> Verification:
        """Loads the file with the WebUI's own Lora loader and counts the stems it cannot place."""
        networks = _networks()
        if networks is None:
            raise HostError("the built-in Lora extension is not loaded, so the file cannot be checked")
        import network
        from safetensors import safe_open

        with safe_open(str(path), "pt") as file:
            stems = sorted({key.split(".", 1)[0] for key in file.keys()})
        mapping = self.sd_model().network_layer_mapping
        is_sd2 = "model_transformer_resblocks" in mapping  # the built-in's own test (SDXL's names start "1_")
        keys = {stem: _builtin_key(networks, mapping, stem, is_sd2) for stem in stems}
        placeable = set(keys.values())
        unmatched = [stem for stem, key in keys.items() if not _placed(mapping, key, placeable)]
        loaded = networks.load_network(Path(path).stem, network.NetworkOnDisk(Path(path).stem, str(path)))
        return Verification(stems=len(stems), matched=len(loaded.modules), unmatched=unmatched)


_PROJECTION = re.compile(r"(.*)_(q|k|v|out)_proj")
_FUSED_PROJECTIONS = ("q", "k", "v", "out")


def _placed(mapping, key: str, keys: Set[str]) -> bool:
    """Whether the built-in loader places a layer name (from its own conversion of a stem) on the model.

    A layer of the model is placed; a q/k/v projection is placed on the layer that holds it fused; a
    `nn.MultiheadAttention`'s q, k, v and out are merged together or not at all, so only when the file (`keys`)
    has all four of them.
    """
    import torch

    projection = _PROJECTION.fullmatch(key)
    holder = mapping.get(projection.group(1)) if projection else None
    if isinstance(holder, torch.nn.MultiheadAttention):
        return all(f"{projection.group(1)}_{part}_proj" in keys for part in _FUSED_PROJECTIONS)
    return key in mapping or (holder is not None and projection.group(2) != "out")


def _builtin_key(networks, mapping, stem: str, is_sd2: bool) -> str:
    """The layer name the built-in loader files the stem under (A1111 1.10.1 networks.load_network): its name
    conversion when that names a layer or, for q/k/v, a layer holding them fused; else SDXL's compvis UNet and
    lora_te1 names, when one of those names a layer."""
    key = networks.convert_diffusers_name_to_compvis(stem, is_sd2)
    projection = _PROJECTION.fullmatch(key)
    if key in mapping or (projection and projection.group(2) != "out" and projection.group(1) in mapping):
        return key
    if "lora_unet" in stem:
        candidates = [stem.replace("lora_unet", "diffusion_model")]
    elif "lora_te1_text_model" in stem:
        candidates = [stem.replace("lora_te1_text_model", name)
                      for name in ("0_transformer_text_model", "transformer_text_model")]
    else:
        candidates = []
    return next((candidate for candidate in candidates if candidate in mapping), key)
