"""Everything a run will write, checked before its first step, and a final save that never loses the adapters.

Hours of training must not end in a refused write. `prepared_saves` lists the files the run will write (the
LoRA, epoch files, checkpoints), then before the first step: creates and probes each folder (a folder, writable,
the longest name the run will use accepted by its file system), takes the (output folder, name) lock
(`run_lock`), refuses files of that name left by another run unless `output.overwrite` (a resumed run may
replace what it wrote itself: files carry their run's id, `ss_session_id` in a LoRA, `run` in a checkpoint),
serializes the metadata once and checks the free space for it all. `save_final` writes the LoRA; when that
fails anyway (a disk filled up meanwhile), it writes the adapters to the checkpoint folder, else the system temp
folder, and says where in `SaveFailedError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

from safetensors import SafetensorError, safe_open

from . import run_lock
from .checkpoint import CheckpointError, checkpoint_folder, read_state
from .config import OutputConfig, TrainConfig
from .export import epoch_file_path, save_lora, serialized_size
from .trainer import Trainer, step_plan

RANDOM_PART = "x" * 8  # the length of the random part of a temporary name (export, checkpoint)
OPTIMIZER_STATE_COPIES = {"AdamW": 2, "AdamW8bit": 2, "Prodigy": 4, "Lion": 1}  # fp32 copies per parameter
STATE_BYTES_PER_STEP = 32  # state.json keeps every step's loss
MARGIN_BYTES = 1 << 20  # headers, TensorBoard events, the file system's own blocks
MIB = 1 << 20


class SavePlanError(ValueError):
    """The run could not save what it trains; the message names the setting and the fix."""


class SaveFailedError(OSError):
    """The LoRA could not be written where it was asked; `result` says where it was written instead, if anywhere."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result

    @property
    def report(self) -> Dict[str, object]:
        result = self.result
        if result is None:
            return {}
        return {"steps": result.steps, "total_steps": result.total_steps, "losses": result.losses,
                "lora_fallback": str(result.lora_path) if result.lora_path else None,
                "checkpoints": [str(path) for path in result.checkpoints],
                "epoch_files": [str(path) for path in result.epoch_files], "log_dir": str(result.log_dir)}


@dataclass
class SavePlan:
    output: OutputConfig
    run_id: str
    final: Path
    epoch_files: Dict[int, Path]  # epoch -> file
    checkpoints: List[Path]
    replaceable: Set[Path] = field(default_factory=set)  # existing files this run wrote before it was resumed

    def may_replace(self, path: Path) -> bool:
        return self.output.overwrite or Path(path) in self.replaceable


def new_run_id() -> str:
    """kohya's session id format: a random 32-bit number (from the OS, so no RNG stream is touched)."""
    return str(secrets.randbelow(2 ** 32))


def plan_saves(output: OutputConfig, per_epoch: int, total: int, start_step: int, run_id: str) -> SavePlan:
    """The files a run from start_step to total (per_epoch steps an epoch) writes."""
    every, save_steps = output.save_every_n_epochs, output.save_steps
    epochs = range(every, (total - 1) // per_epoch + 1, every) if every else []
    steps = range(save_steps, total + 1, save_steps) if save_steps else []
    return SavePlan(output, run_id, output.lora_path,
                    {epoch: epoch_file_path(output, epoch) for epoch in epochs if epoch * per_epoch > start_step},
                    [checkpoint_folder(output, step) for step in steps if step > start_step])


def _folder_error(key: str, folder: Path, error: BaseException) -> SavePlanError:
    if isinstance(error, ValueError):
        return SavePlanError(f"{key}: {str(folder)!r} contains a NUL character; remove it")
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        return SavePlanError(f"{key}: {folder} (or a folder above it) is a file, not a folder; point {key} at a "
                             "folder, or move the file away")
    return SavePlanError(f"{key}: cannot write in {folder} ({error.strerror or error}); choose a folder you can "
                         "write to, or fix its permissions")


def _name_error(folder: Path, name: str, output_name: str) -> SavePlanError:
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    room = limit - (len(os.fsencode(name)) - len(os.fsencode(output_name)))
    return SavePlanError(f"output.output_name: {len(output_name)} characters are too long for the file system of "
                         f"{folder} once the run adds its suffixes (e.g. {name[:12]}...{name[-24:]}); use at most "
                         f"{max(room, 1)} bytes")


def _probe(key: str, folder: Path, name: str, output_name: str, directory: bool = False) -> None:
    """Creates folder and, inside it, a file (or folder) `name`, removed at once; raises SavePlanError if refused."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as error:
        raise _folder_error(key, folder, error) from None
    probe = folder / name
    try:
        if directory:
            os.mkdir(probe)
            os.rmdir(probe)
        else:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
    except ValueError:
        raise SavePlanError(f"output.output_name: {output_name!r} contains a NUL character; remove it") from None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise _name_error(folder, name, output_name) from None
        raise _folder_error(key, folder, error) from None


def check_folders(plan: SavePlan, config: TrainConfig) -> None:
    """Every folder the run writes to exists, is a folder, is writable and takes the run's longest names."""
    output, name = plan.output, plan.output.output_name
    files = [plan.final, *plan.epoch_files.values()]
    longest = max((f".{path.name}.{RANDOM_PART}.tmp" for path in files), key=lambda n: len(os.fsencode(n)))
    _probe("output.output_dir", Path(output.output_dir), longest, name)
    if plan.checkpoints:
        staging = f".{plan.checkpoints[-1].name}-{RANDOM_PART}"
        _probe("output.checkpoint_dir", output.checkpoints_dir, staging, name, directory=True)
    _probe("output.logging_dir", output.log_dir, f".probe-{RANDOM_PART}", name)
    if config.training.cache_latents and config.training.cache_latents_to_disk:
        _probe("output.output_dir", output.latent_cache_dir, f".probe-{RANDOM_PART}", name)


def _run_of_file(path: Path) -> Optional[str]:
    try:
        with safe_open(str(path), "pt") as file:
            return (file.metadata() or {}).get("ss_session_id")
    except (OSError, SafetensorError, ValueError):
        return None  # not a LoRA this run can have written


def _run_of_checkpoint(folder: Path) -> Optional[str]:
    try:
        return read_state(folder).get("run")
    except CheckpointError:
        return None


def check_existing(plan: SavePlan) -> None:
    """Refuses files of the run's names that another run left, unless output.overwrite; notes this run's own."""
    for path in [plan.final, *plan.epoch_files.values()]:
        if not path.exists():
            continue
        if _run_of_file(path) == plan.run_id:
            plan.replaceable.add(path)
        elif not plan.output.overwrite:
            raise SavePlanError(f"output.output_name: {path} already exists (written by another run); choose "
                                "another output.output_name, move the file away, or set output.overwrite: true")
    foreign = [path for path in plan.checkpoints if path.exists() and _run_of_checkpoint(path) != plan.run_id]
    if foreign and not plan.output.overwrite:
        raise SavePlanError(
            f"output.output_name: checkpoints of another run of this name are in {foreign[0].parent} (e.g. "
            f"{foreign[0].name}) and this run would replace them; resume that run with "
            "training.resume_from_checkpoint, choose another output.output_name, or set output.overwrite: true")


def _space_needed(plan: SavePlan, config: TrainConfig, lora_bytes: int, parameters: int,
                  total_steps: int) -> List[Tuple[str, Path, int]]:
    """(config key, folder, bytes) for each folder the run writes big files to."""
    copies = 1 + OPTIMIZER_STATE_COPIES.get(config.training.optimizer, 2)
    checkpoint_bytes = 4 * parameters * copies + STATE_BYTES_PER_STEP * total_steps
    return [("output.output_dir", Path(plan.output.output_dir), lora_bytes * (1 + len(plan.epoch_files))),
            ("output.checkpoint_dir", plan.output.checkpoints_dir, checkpoint_bytes * len(plan.checkpoints))]


def check_space(plan: SavePlan, config: TrainConfig, trainer: Trainer, metadata: Dict[str, str]) -> None:
    """Enough free space for the LoRA, its epoch files and the checkpoints (measured by serializing once)."""
    tensors = trainer.network.state_dict()
    lora_bytes = serialized_size(tensors, metadata, plan.output.save_precision)
    parameters = sum(tensor.numel() for tensor in tensors.values())
    needs: Dict[int, List] = {}
    for key, folder, size in _space_needed(plan, config, lora_bytes, parameters, trainer.total_steps):
        if size:  # the folders written to were created by check_folders
            entry = needs.setdefault(os.stat(folder).st_dev, [key, folder, MARGIN_BYTES])
            entry[2] += size
    for key, folder, size in needs.values():
        free = shutil.disk_usage(folder).free
        if size > free:
            raise SavePlanError(
                f"{key}: the run will write about {size / MIB:.1f} MiB (the LoRA, {len(plan.epoch_files)} epoch "
                f"files, {len(plan.checkpoints)} checkpoints) to {folder}, but {free / MIB:.1f} MiB are free; free "
                "some space, or write fewer checkpoints and epoch files (output.save_steps, "
                "output.save_every_n_epochs)")


def _resume_state(config: TrainConfig) -> Tuple[Optional[str], int]:
    """(run id, step) of the checkpoint the run resumes from; (None, 0) for a new run."""
    folder = config.training.resume_from_checkpoint
    if not folder:
        return None, 0
    state = read_state(Path(folder))
    position = state.get("position")
    return state.get("run"), int(position.get("step", 0)) if isinstance(position, dict) else 0


def _checked_plan(config: TrainConfig, dataset) -> SavePlan:
    """The run's files, its folders created and probed."""
    run_id, start_step = _resume_state(config)
    per_epoch, total = step_plan(dataset, config.training)
    plan = plan_saves(config.output, per_epoch, total, start_step, run_id or new_run_id())
    check_folders(plan, config)
    return plan


def check_plan(config: TrainConfig, dataset) -> None:
    """What can be checked before a model is at hand (folders, names, earlier files, another run), for a caller
    that must answer at once (the HTTP API); raises as prepared_saves does."""
    plan = _checked_plan(config, dataset)
    run_lock.check_free(Path(config.output.output_dir), config.output.output_name)
    check_existing(plan)


@contextlib.contextmanager
def prepared_saves(config: TrainConfig, trainer: Trainer,
                   metadata: Callable[[Trainer], Dict[str, str]]) -> Iterator[SavePlan]:
    """Checks everything the run's saves need and holds the (output folder, name) lock for the block.

    Raises:
        SavePlanError: a folder, name, earlier file or free space the saves would fail on.
        RunLockedError: another run is writing the same name.
        CheckpointError: the checkpoint to resume from is damaged.
    """
    plan = _checked_plan(config, trainer.dataset)
    with run_lock.held(Path(config.output.output_dir), config.output.output_name, plan.run_id):
        check_existing(plan)
        check_space(plan, config, trainer, metadata(trainer))
        trainer.run_id = plan.run_id
        yield plan


def fallback_name(output_name: str, run_id: str) -> str:
    """A name any file system takes: the output name's word characters, shortened, and the run id."""
    stem = re.sub(r"[^\w.-]+", "_", output_name)[:64].strip("._") or "lora"
    return f"{stem}-{run_id}.safetensors"


def _reason(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def save_final(plan: SavePlan, tensors, metadata: Dict[str, str]) -> Tuple[Optional[Path], Optional[str]]:
    """(where the LoRA was written, None) or, when the output folder refused it, (where it went instead, why).

    Raises:
        SaveFailedError: it could not be written anywhere.
    """
    precision = plan.output.save_precision
    try:
        return save_lora(plan.final, tensors, metadata, precision, overwrite=plan.may_replace(plan.final)), None
    except (OSError, ValueError) as error:
        failure = error
    tried = []
    for folder in (plan.output.checkpoints_dir, Path(tempfile.gettempdir())):
        path = folder / fallback_name(plan.output.output_name, plan.run_id)
        try:
            saved = save_lora(path, tensors, metadata, precision)
        except (OSError, ValueError) as error:
            tried.append(f"{folder}: {_reason(error)}")
            continue
        return saved, (f"output.output_dir: the LoRA could not be written to {plan.final} ({_reason(failure)}); "
                       f"the trained adapters were saved to {saved} instead: move that file into your Lora folder")
    raise SaveFailedError(f"output.output_dir: the LoRA could not be written to {plan.final} ({_reason(failure)}) "
                          f"nor to {'; '.join(tried)}; free some disk space and resume from the last checkpoint")

