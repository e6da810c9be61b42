"""Resumable training checkpoints: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint folder holds `lora.safetensors` (fp32 adapters), `optimizer.safetensors` (the optimizer's
tensors, flattened), and `state.json` (step position, optimizer hyper-parameters, scheduler and grad-scaler
state, the settings a resume must share). Random draws are derived from (seed, micro-step), so the position
is all the RNG state a resume needs. Folders are written under a temporary name and renamed when complete.
A damaged checkpoint (a file missing, empty or cut short) raises `CheckpointError` naming the file and the
other checkpoints beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
TENSOR_FILES = ("lora.safetensors", "optimizer.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot resume this run; the message says why."""


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next micro-batch belongs to
    batch: int = 0  # index of the next micro-batch within that epoch
    losses: List[float] = field(default_factory=list)  # loss of every optimizer step so far


def _flatten_optimizer(state: Dict[str, Any]) -> tuple:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], rest: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def checkpoint_folder(output, step: int) -> Path:
    """Where the checkpoint after `step` goes, for an OutputConfig."""
    return output.checkpoints_dir / f"{output.output_name}-step{step:06d}"


def save_checkpoint(folder: Path, adapters: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    extra_state: Dict[str, Any], position: Position, settings: Dict[str, Any]) -> Path:
    """Writes the checkpoint folder atomically; returns its path."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _write_tensors({k: v.detach().float().cpu().contiguous() for k, v in adapters.items()},
                       staging / "lora.safetensors")
        tensors, optimizer_rest = _flatten_optimizer(optimizer.state_dict())
        _write_tensors(tensors, staging / "optimizer.safetensors")
        state = {"position": asdict(position), "optimizer": optimizer_rest, "settings": settings, **extra_state}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def _write_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    """save_file, with a write error (a full disk) raised as the OSError it is, not safetensors' own type."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as error:
        raise OSError(f"{path.name} could not be written: {error}") from None


@dataclass
class Checkpoint:
    adapters: Dict[str, torch.Tensor]
    optimizer: Dict[str, Any]
    position: Position
    settings: Dict[str, Any]
    extra: Dict[str, Any]


def load_checkpoint(folder: Path) -> Checkpoint:
    """Everything a resume needs from the folder.

    Raises:
        CheckpointError: not a checkpoint, or one of its files is missing or damaged (the message names it).
    """
    folder = Path(folder)
    state = read_state(folder)
    adapters, optimizer_tensors = (_read_tensors(folder / name) for name in TENSOR_FILES)
    try:
        optimizer = _unflatten_optimizer(optimizer_tensors, state.pop("optimizer"))
        position, settings = Position(**state.pop("position")), state.pop("settings")
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _damaged(folder / STATE_FILE, f"it lacks part of the state: {error}") from None
    return Checkpoint(adapters=adapters, optimizer=optimizer, position=position, settings=settings, extra=state)


def read_state(folder: Path) -> Dict[str, Any]:
    """The checkpoint's state.json as a dict (its "run" key is the id of the run that wrote it)."""
    path = Path(folder) / STATE_FILE
    if not Path(folder).is_dir() or not path.exists():
        raise CheckpointError(f"{folder} is not a training checkpoint (no {STATE_FILE}); "
                              "point training.resume_from_checkpoint at a folder under <output_dir>/checkpoints")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise _damaged(path, str(error) or "empty file") from None
    if not isinstance(state, dict):
        raise _damaged(path, "it holds no training state")
    return state


def _read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise _damaged(path, "the file is missing") from None
    except (OSError, SafetensorError, ValueError) as error:
        raise _damaged(path, f"{error}; the file is empty or cut short") from None


def _damaged(path: Path, reason: str) -> CheckpointError:
    """Names the damaged file and the other checkpoints in its folder to resume from instead."""
    folder = path.parent
    others = sorted(p.name for p in folder.parent.iterdir() if p != folder and (p / STATE_FILE).is_file()) \
        if folder.parent.is_dir() else []
    fix = (f"resume from another checkpoint in {folder.parent}: {', '.join(others)}" if others else
           "no other checkpoint is beside it; start again without training.resume_from_checkpoint")
    return CheckpointError(f"the checkpoint {folder.name} is damaged: {path.name} cannot be read ({reason}); {fix}")


def check_settings(saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    """Refuses a resume whose data order or network shape would differ from the checkpoint's."""
    changed = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in current.items() if saved.get(key) != value]
    if changed:
        raise CheckpointError("the checkpoint was made with other settings (" + "; ".join(changed) +
                              "); restore them to resume, or start a new run without resume_from_checkpoint")
