"""Resumable training checkpoints: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint folder holds `lora.safetensors` (fp32 adapters), `optimizer.safetensors` (the optimizer's
tensors, flattened), and `state.json` (step position, optimizer hyper-parameters, scheduler and grad-scaler
state, the settings a resume must share). Random draws are derived from (seed, micro-step), so the position
is all the RNG state a resume needs. Folders are written under a temporary name and renamed when complete.
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
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"


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


def save_checkpoint(folder: Path, adapters: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    extra_state: Dict[str, Any], position: Position, settings: Dict[str, Any]) -> Path:
    """Writes the checkpoint folder atomically; returns its path."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in adapters.items()},
                  str(staging / "lora.safetensors"))
        tensors, optimizer_rest = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(staging / "optimizer.safetensors"))
        state = {"position": asdict(position), "optimizer": optimizer_rest, "settings": settings, **extra_state}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


@dataclass
class Checkpoint:
    adapters: Dict[str, torch.Tensor]
    optimizer: Dict[str, Any]
    position: Position
    settings: Dict[str, Any]
    extra: Dict[str, Any]


def load_checkpoint(folder: Path) -> Checkpoint:
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder} is not a training checkpoint (no {STATE_FILE}); "
                              "point training.resume_from_checkpoint at a folder under <output_dir>/checkpoints")
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    optimizer = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), state.pop("optimizer"))
    return Checkpoint(adapters=load_file(str(folder / "lora.safetensors")), optimizer=optimizer,
                      position=Position(**state.pop("position")), settings=state.pop("settings"), extra=state)


def check_settings(saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    """Refuses a resume whose data order or network shape would differ from the checkpoint's."""
    changed = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in current.items() if saved.get(key) != value]
    if changed:
        raise CheckpointError("the checkpoint was made with other settings (" + "; ".join(changed) +
                              "); restore them to resume, or start a new run without resume_from_checkpoint")
