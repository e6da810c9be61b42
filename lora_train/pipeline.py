"""One training run from a validated config and a loaded model: dataset, adapters, trainer, LoRA file.

The CLI and the WebUI both call `train_lora`. The model is used in place: adapters are hooked on for the run
and removed afterwards, every flag the run changed is restored, and the process RNG state is untouched. The
final file is written only when the run ends or is stopped with "save"; "discard" writes nothing. Everything
the saves need is checked before the first step (`save_plan`); a final file the output folder refuses goes to
the checkpoint or temp folder, and `SaveFailedError` says where.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

import torch

from .caption_window import warn_long_captions
from .config import TrainConfig
from .dataset import Dataset, load_dataset
from .export import build_metadata, epoch_file_path, save_lora
from .models import DiffusionModel, TargetSpec
from .runtime import float32_matmul_precision
from .network import LoRANetwork, NetworkSpec, create_network
from .preflight import changes_text, check_device_memory, remedies
from .save_plan import SaveFailedError, SavePlan, prepared_saves, save_final
from .tb_logger import TensorBoardLogger
from .trainer import Callback, Trainer

logger = logging.getLogger(__name__)


class TrainingOutOfMemoryError(RuntimeError):
    """The device ran out of memory mid-run; the model was restored, the message says what to change and
    `changes` holds those settings ({"training.batch_size": 2, ...})."""

    def __init__(self, message: str, changes: Dict[str, object]):
        super().__init__(message)
        self.changes = changes


@dataclass
class TrainResult:
    state: str  # "done" | "stopped" (stopped early, saved) | "discarded"
    lora_path: Optional[Path]
    steps: int
    total_steps: int
    losses: List[float]
    seconds: float
    log_dir: Path
    epoch_files: List[Path] = field(default_factory=list)
    checkpoints: List[Path] = field(default_factory=list)
    skipped_steps: int = 0  # steps whose gradients were not finite and were not applied
    save_failures: List[str] = field(default_factory=list)  # checkpoints and epoch files that could not be written


def build_network(config: TrainConfig, model: DiffusionModel) -> LoRANetwork:
    net = config.model
    spec = TargetSpec(text_encoder=net.train_text_encoder, conv=net.conv_rank > 0)
    return create_network(model.lora_targets(spec), NetworkSpec(
        rank=net.lora_rank, alpha=net.alpha, dropout=net.dropout, conv_rank=net.conv_rank,
        conv_alpha=net.conv_alpha, seed=config.training.seed), device=model.device)


@contextlib.contextmanager
def attached(network: LoRANetwork) -> Iterator[None]:
    handle = network.attach()
    try:
        yield
    finally:
        handle.detach()


def _forked_rng(device: torch.device):
    cuda = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


class _Artifacts:
    """Trainer callback: epoch LoRA files (save_every_n_epochs) and the list of checkpoints written."""

    def __init__(self, config: TrainConfig, model: DiffusionModel, dataset: Dataset):
        self.config, self.model, self.dataset = config, model, dataset
        self.plan: Optional[SavePlan] = None
        self.epoch_files: List[Path] = []
        self.checkpoints: List[Path] = []

    def __call__(self, event: str, trainer: Trainer) -> None:
        if event == "checkpoint":
            self.checkpoints.append(trainer.last_checkpoint)
        every = self.config.output.save_every_n_epochs
        epoch = trainer.position.epoch
        if event == "epoch" and every and epoch % every == 0 and trainer.position.step < trainer.total_steps:
            self._save_epoch(trainer, epoch_file_path(self.config.output, epoch))

    def _save_epoch(self, trainer: Trainer, path: Path) -> None:
        """Writes an epoch file; one that cannot be written (a full disk) is reported and training goes on."""
        try:
            self.epoch_files.append(save_lora(path, trainer.network.state_dict(), self.metadata(trainer),
                                              self.config.output.save_precision, self.plan.may_replace(path)))
        except (OSError, ValueError) as error:
            trainer.save_failures.append(f"{path.name}: {error}")
            logger.warning("the epoch file %s could not be written (%s); training goes on", path, error)

    def metadata(self, trainer: Trainer):
        metadata = build_metadata(self.config, self.model, trainer.network, self.dataset, trainer.position.step,
                                  trainer.position.epoch)
        return {**metadata, "ss_session_id": trainer.run_id or ""}  # the run that wrote the file


def train_lora(config: TrainConfig, model: DiffusionModel, callbacks: Iterable[Callback] = (),
               dataset: Optional[Dataset] = None) -> TrainResult:
    """Trains a LoRA on `model` (a DiffusionModel) as configured; returns what was written."""
    started = time.perf_counter()
    output = config.output
    dataset = dataset if dataset is not None else load_dataset(config.data)
    warn_long_captions(model, dataset)
    network = build_network(config, model)
    trainer = Trainer(model, network, dataset, config, model.device)
    artifacts = _Artifacts(config, model, dataset)
    with prepared_saves(config, trainer, artifacts.metadata) as artifacts.plan:
        tensorboard = TensorBoardLogger(output.log_dir)
        for callback in (tensorboard, artifacts, *callbacks):
            trainer.add_callback(callback)
        try:
            with _forked_rng(model.device), float32_matmul_precision(config.training.matmul_precision), \
                    model.training(config.training.gradient_checkpointing, config.model.train_text_encoder), \
                    attached(network):
                largest = max(dataset.bucket_counts(), key=lambda bucket: bucket[0] * bucket[1])
                check_device_memory(model, config, largest, sum(p.numel() for p in network.parameters()))
                network.train()
                trainer.run()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            changes = remedies(config)
            raise TrainingOutOfMemoryError(
                f"the GPU ran out of memory at step {trainer.position.step + 1}; the model is restored. Set "
                f"{changes_text(changes)} (or close other programs using the GPU) and start again", changes) from None
        finally:
            tensorboard.close()
        state = {None: "done", "save": "stopped", "discard": "discarded"}[trainer.stop_mode]
        path, problem = (save_final(artifacts.plan, network.state_dict(), artifacts.metadata(trainer))
                         if state != "discarded" else (None, None))
    result = TrainResult(state=state, lora_path=path, steps=trainer.position.step, total_steps=trainer.total_steps,
                         losses=list(trainer.position.losses), seconds=time.perf_counter() - started,
                         log_dir=output.log_dir, epoch_files=artifacts.epoch_files,
                         checkpoints=artifacts.checkpoints, skipped_steps=trainer.skipped_steps,
                         save_failures=trainer.save_failures)
    if problem:
        raise SaveFailedError(problem, result)
    return result
