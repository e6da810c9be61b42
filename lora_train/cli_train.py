"""`python -m lora_train train --config x.yaml [--dry-run]`: standalone training from a YAML file (SD1, SD2, SDXL).

Prints a progress bar (step, loss, it/s, ETA) and a summary of where every file went. Exit code 0 on success;
a user mistake (bad config, dataset, model or output name) or a fault (a damaged checkpoint, a disk that
filled up) prints one line starting with "error:" and exits 2; when the LoRA had to be written somewhere else,
the summary and that line say where. The first Ctrl+C stops after the current step and saves; a second one (or
one while the model loads) aborts without saving and exits 130. With
`--apply-advice`, settings that do not fit the GPU are changed as the memory preflight suggests, and the run starts
once more.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING, Optional

import yaml

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig, load_config
from .dataset import DatasetError, load_dataset
from .export import OutputExistsError
from .models import DiffusionModel, ModelLoadError
from .pipeline import TrainingOutOfMemoryError
from .preflight import MemoryPreflightError, apply_changes, changes_text
from .run_lock import RunLockedError
from .save_plan import SaveFailedError, SavePlanError
from .trainer import TrainingDivergedError, step_plan

if TYPE_CHECKING:
    import torch

USER_ERRORS = (ConfigError, DatasetError, ModelLoadError, CheckpointError, OutputExistsError, ImportError,
               TrainingDivergedError, MemoryPreflightError, TrainingOutOfMemoryError, SavePlanError, RunLockedError,
               SaveFailedError)
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl+C


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a LoRA from a YAML config",
                                   description="Train a LoRA on a Stable Diffusion 1.x, 2.x or SDXL checkpoint "
                                               "(.safetensors file or diffusers folder).")
    parser.add_argument("--config", required=True, help="YAML file (see lora_train/configs/lora_default.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, dataset report, buckets and step count; train nothing")
    parser.add_argument("--apply-advice", action="store_true",
                        help="when the settings do not fit the GPU's memory, apply the suggested changes and "
                             "start again (once)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config).validate()
        if args.dry_run:
            return _dry_run(config)
        return _train(config, args.apply_advice)
    except USER_ERRORS as error:
        if getattr(error, "result", None) is not None:
            _print_summary(error.result)  # trained, but written elsewhere: the summary says where
        hint = " (or rerun with --apply-advice)" if getattr(error, "changes", None) else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: stopped without saving (a checkpoint written by output.save_steps can be resumed)",
              file=sys.stderr)
        return INTERRUPTED_EXIT


def _dry_run(config: TrainConfig) -> int:
    print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
    dataset = load_dataset(config.data)
    print("\n" + dataset.report.summary())
    print("\nbuckets (width x height: images incl. repeats):")
    for (width, height), count in sorted(dataset.bucket_counts().items()):
        print(f"  {width}x{height}: {count}")
    print("\n" + _plan(config, dataset))
    return 0


def _plan(config: TrainConfig, dataset) -> str:
    train = config.training
    per_epoch, total = step_plan(dataset, train)
    return (f"{per_epoch} optimizer steps per epoch x {train.epochs} epochs -> {total} steps"
            + (" (max_train_steps)" if train.max_train_steps else ""))


class _Progress:
    """Trainer callback drawing a tqdm bar and forwarding Ctrl+C as a stop request."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = None
        self.stop_mode: Optional[str] = None

    def __call__(self, event: str, trainer) -> None:
        if self.stop_mode and trainer.stop_mode is None:
            trainer.request_stop(self.stop_mode)
        info = trainer.info
        if event == "cache" and info.cached == info.cache_total:
            print(f"cached latents of {info.cache_total} images", file=sys.stderr)
        if event != "step":
            return
        if self.bar is None:
            self.bar = self._tqdm(total=info.total_steps, initial=info.step - 1, unit="step", dynamic_ncols=True)
        self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
        self.bar.update(1)

    def interrupt(self, _signum, _frame) -> None:
        if self.stop_mode:
            raise KeyboardInterrupt
        self.stop_mode = "save"
        print("\nstopping after this step and saving (Ctrl+C again to abort)", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def load_for_training(config: TrainConfig, device) -> DiffusionModel:
    """The config's base model as a run needs it: on `device`, cast as it is read; on the CPU its UNet is read
    only once the caches are filled (on a GPU the memory preflight runs it first)."""
    from .models.diffusers import load_diffusers_model

    return load_diffusers_model(config.model.base_model, device, _weight_dtype(config, device),
                                defer_unet=device.type == "cpu")


def _train(config: TrainConfig, apply_advice: bool = False) -> int:
    import torch

    dataset = load_dataset(config.data)
    print(dataset.report.summary(), file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loading {config.model.base_model} on {device}", file=sys.stderr)
    model = load_for_training(config, device)
    progress = _Progress()
    previous = signal.signal(signal.SIGINT, progress.interrupt)
    try:
        result = _train_fitting(config, model, dataset, progress, apply_advice)
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.close()
    _print_summary(result)
    return 0


def _train_fitting(config: TrainConfig, model, dataset, progress: _Progress, apply_advice: bool):
    """train_lora; with apply_advice, a run that does not fit the GPU starts once more with the suggested changes."""
    from .pipeline import train_lora

    try:
        return train_lora(config, model, callbacks=[progress], dataset=dataset)
    except (MemoryPreflightError, TrainingOutOfMemoryError) as error:
        if not (apply_advice and error.changes):
            raise
        changes = error.changes
    print(f"memory: applying {changes_text(changes)} and starting again", file=sys.stderr)
    progress.close()
    config = apply_changes(config, changes)
    if any(key.startswith("data.") for key in changes):
        dataset = load_dataset(config.data)  # the buckets follow the resolution
    return train_lora(config, model, callbacks=[progress], dataset=dataset)


def _weight_dtype(config: TrainConfig, device) -> "torch.dtype":
    """Frozen base weights in half precision on a GPU (adapters stay fp32); fp32 on the CPU."""
    import torch

    if device.type != "cuda" or config.training.mixed_precision == "no":
        return torch.float32
    return torch.float16 if config.training.mixed_precision == "fp16" else torch.bfloat16


def _print_summary(result) -> None:
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    lines = [f"training {result.state}: {result.steps}/{result.total_steps} steps in {result.seconds:.1f} s, "
             f"final loss {final}"]
    if result.skipped_steps:
        lines.append(f"skipped:     {result.skipped_steps} steps with non-finite gradients (not applied)")
    lines += [f"not written: {failure}" for failure in result.save_failures]
    if result.lora_path:
        lines.append(f"LoRA:        {result.lora_path}")
    lines += [f"epoch file:  {path}" for path in result.epoch_files]
    lines += [f"checkpoint:  {path}" for path in result.checkpoints]
    lines.append(f"TensorBoard: {result.log_dir}  (tensorboard --logdir {result.log_dir})")
    print("\n".join(lines))
