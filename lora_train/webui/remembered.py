"""What the tab remembers between page reloads and WebUI restarts, and the output name it proposes.

The last-used folder, settings and preview settings are one JSON file beside the presets (`host.presets_dir()`),
written when a folder is loaded and when a run starts. The output name comes from the dataset folder and is made
unique against the Lora folder (`mystyle`, then `mystyle_2`), so a second run never collides with the first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Optional

from ..captions_io import write_text_atomic

FILE_NAME = "last-used.json"  # not .yaml, so it is never listed as a preset
DEFAULT_NAMES = {"my_lora", "my_sdxl_lora", ""}  # the built-in presets' output names: replaced by the folder's
_NOT_IN_NAMES = re.compile(r"[^\w-]+")


def load(presets_dir: Path) -> Dict[str, Any]:
    """{"folder", "preset", "config", "preview"} as last saved; {} when nothing was saved or the file is unreadable."""
    path = Path(presets_dir) / FILE_NAME
    try:
        remembered = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return remembered if isinstance(remembered, dict) else {}


def save(presets_dir: Path, **values: Any) -> None:
    """Updates the remembered values given (folder=..., config=...), keeping the others."""
    remembered = {**load(presets_dir), **values}
    Path(presets_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(presets_dir) / FILE_NAME, json.dumps(remembered, indent=1, sort_keys=True))


def name_for_folder(dataset_folder: str) -> str:
    """"my style!" -> "my_style": the folder's name as a LoRA file name (letters, digits, - and _)."""
    name = _NOT_IN_NAMES.sub("_", Path(str(dataset_folder).rstrip("/\\")).name).strip("_")
    return name or "lora"


def unique_name(lora_dir: Path, base: str) -> str:
    """base, or base_2, base_3, ...: the first without a .safetensors in the Lora folder."""
    name, number = base, 1
    while (Path(lora_dir) / f"{name}.safetensors").exists():
        number += 1
        name = f"{base}_{number}"
    return name


def proposed_name(lora_dir: Path, current: str, dataset_folder: str, last_folder: Optional[str] = None) -> str:
    """The output name to show after a folder is loaded or a run ended: a built-in default or a name made from
    this (or the last) folder becomes the folder's name, unique; a name the user typed is kept."""
    bases = {name_for_folder(folder) for folder in (dataset_folder, last_folder) if folder}
    derived = any(re.fullmatch(rf"{re.escape(base)}(_\d+)?", current or "") for base in bases)
    if (current or "") not in DEFAULT_NAMES and not derived:
        return current
    return unique_name(lora_dir, name_for_folder(dataset_folder)) if dataset_folder else current


def name_clash(lora_dir: Path, name: str, overwrite: bool) -> str:
    """The note beside the name field: empty, or that a file of that name exists and what to do."""
    if not name or overwrite or not (Path(lora_dir) / f"{name}.safetensors").exists():
        return ""
    free = unique_name(lora_dir, re.sub(r"_\d+$", "", name))
    return (f"**{name}.safetensors** is already in the Lora folder: pick another name (`{free}` is free) or tick "
            "Overwrite under Advanced > Output.")
