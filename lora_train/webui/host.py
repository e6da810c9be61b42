"""What a job needs from the WebUI it runs in: the `Host` protocol, one implementation per WebUI.

`a1111.py` is AUTOMATIC1111 1.10 (and the WebUIs that keep its shell). A new WebUI is one new file implementing
`Host`, chosen in `callbacks.pick_host()`; the tab, the API and the jobs only ever see the protocol.
`forge.py` is Stable Diffusion WebUI Forge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Dict, List, Optional, Protocol

from ..models import DiffusionModel


PREVIEW_SAMPLER = "Euler a"  # the sampler of previews and test images, which "Send to txt2img" passes on


class HostError(ValueError):
    """The WebUI is not in a state to train; the message says what to change."""


@dataclass
class Verification:
    """How the WebUI's own Lora loader sees a file: modules matched, stems it could not place."""

    stems: int
    matched: int
    unmatched: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unmatched and self.matched > 0


@dataclass
class CheckpointFacts:
    """What the tab tells about the loaded checkpoint: to suggest a caption model and pick a preset."""

    name: str
    family: Optional[str]  # a key of models.families.FAMILIES; None: not a model this extension trains
    metadata: Dict[str, str] = field(default_factory=dict)  # the file's safetensors metadata, {} when none


class Host(Protocol):
    def exclusive(self, job: str, task_id: Optional[str] = None) -> ContextManager:
        """The WebUI's GPU to ourselves for the block (its queue lock), with its progress state bracketed."""

    def end_task(self, task_id: Optional[str]) -> None:
        """The page's progress bar for a task id stops waiting: the job it was for was refused."""

    def check_trainable(self) -> None:
        """Raises HostError (what to change) when the loaded model or the WebUI's flags cannot train."""

    def training_model(self) -> DiffusionModel:
        """The loaded checkpoint as a DiffusionModel, as the checkpoint file has it (no LoRA merged in)."""

    def checkpoint_name(self) -> str: ...

    def checkpoint_facts(self) -> CheckpointFacts:
        """The loaded checkpoint's name, family and file metadata, looked at in place (nothing is copied or
        changed); raises HostError when none is loaded."""

    def generate(self, prompt: str, seed: int, steps: int = 20, width: int = 512, height: int = 512,
                 negative_prompt: str = "", cfg_scale: float = 7.0, sampler: str = PREVIEW_SAMPLER):
        """One PIL image from the WebUI's own pipeline and sampler; the caller holds `exclusive`. After
        `stop_generation` (or the WebUI's Interrupt) it returns early: a partly denoised image, or None."""

    def stop_generation(self) -> None:
        """Cuts the image `generate` is making short (from another thread); the WebUI's own Interrupt state is
        as it was once `generate` returns."""

    def report(self, step: int, total: int, text: str) -> None:
        """Progress for the WebUI's own progress bar."""

    def interrupted(self) -> bool:
        """Whether the user pressed the WebUI's Interrupt."""

    def show_image(self, image) -> None:
        """Shows the image as the WebUI's live preview."""

    def lora_dir(self) -> Path: ...

    def work_dir(self, name: str) -> Path:
        """Logs, checkpoints and previews of the run `name`, outside the Lora folder."""

    def presets_dir(self) -> Path: ...

    def after_save(self, path: Path) -> Verification:
        """A new LoRA file landed: verify it with the WebUI's loader, refresh the Lora list, drop stale caches."""

