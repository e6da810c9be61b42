"""What the tab's buttons do, without gradio: plain functions over folders, caption rows and jobs.

Caption rows are `[[relative image path, caption], ...]` as the editable grid holds them. Edits stay in the
grid until "Save captions", which writes only the sidecars whose text changed (atomically) and never a path
outside the image folder. The tag view counts the grid's tags as `ss_tag_frequency` records them, lists the
images of a tag, and renames or removes a tag in every caption at once. Long work runs as a job in the shared
`JobRunner`; the tab polls its snapshot.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..captioning import DEFAULT_MODEL, suggest_caption_model
from ..captions_io import count_tags, read_sidecar, split_tags, write_text_atomic
from ..config import (DEFAULT_CONFIG_PATH, ConfigError, DataConfig, TrainConfig, config_from_dict, load_config,
                      save_config)
from ..dataset import load_dataset
from ..jobs import JobRunner
from ..trainer import step_plan
from .form import in_words
from .host import Host

Rows = List[List[str]]
SIDECAR = ".txt"
BUILTIN_PRESETS = {"default": DEFAULT_CONFIG_PATH, "sdxl": DEFAULT_CONFIG_PATH.parent / "sdxl.yaml"}  # name: file
FAMILY_PRESETS = {"sdxl": "sdxl"}  # model family -> the built-in preset its tab starts from; others: "default"


def scan_folder(folder: str) -> Tuple[str, Rows, List[Tuple[str, str]]]:
    """(report markdown, caption rows, gallery items) for an image folder; errors become the report."""
    if not folder or not Path(folder).is_dir():
        name = html.escape(folder or "No folder")
        return f"**{name}** is not a folder: enter the folder that holds your images.", [], []
    try:
        dataset = load_dataset(DataConfig(train_data_dir=folder))
    except ValueError as error:
        return f"**Cannot use this folder:** {html.escape(str(error))}", [], []
    root = Path(folder)
    rows = [[sample.path.relative_to(root).as_posix(), sample.caption] for sample in dataset.samples]
    report = html.escape(dataset.report.summary()).replace("\n", "  \n")
    return f"**{len(rows)} images.** {report}", rows, gallery_items(folder, rows)


def gallery_items(folder: str, rows: Any) -> List[Tuple[str, str]]:
    """(image path, caption) for the gallery, from the grid's rows: it shows the captions as edited."""
    root = Path(folder)
    return [(str(_inside(root, path)), caption or "(no caption)") for path, caption in _clean(rows)]


def caption_trigger(rows: Any) -> str:
    """The first tag that at least half of the captions start with (the trigger word they use), else ""."""
    firsts = [split_tags(caption)[:1] for _, caption in _clean(rows)]
    counts = count_tags(first[0] for first in firsts if first)
    if not counts:
        return ""
    tag, count = max(counts.items(), key=lambda item: item[1])
    starts = next(first[0] for first in firsts if first and first[0].lower() == tag)  # as the captions spell it
    return starts if 2 * count >= len(firsts) else ""


def _inside(folder: Path, relative: str) -> Path:
    path = (folder / relative).resolve()
    if folder.resolve() not in path.parents:
        raise ValueError(f"{relative!r} is not inside the image folder")
    return path


def save_captions(folder: str, rows: Rows) -> str:
    """Writes the sidecar of every row whose caption differs from the file; returns what was done."""
    root, written = Path(folder), 0
    for relative, caption in _clean(rows):
        sidecar = _inside(root, relative).with_suffix(SIDECAR)
        if sidecar.is_file() and read_sidecar(sidecar) == caption.strip():
            continue
        write_text_atomic(sidecar, caption.strip())
        written += 1
    return f"Saved {written} changed caption{'s' if written != 1 else ''} ({len(rows)} images)."


def _clean(rows: Any) -> Rows:
    """Grid rows as [path, caption] strings (a DataFrame's rows or lists), without empty rows."""
    values = rows.values.tolist() if hasattr(rows, "values") else rows or []
    return [[str(row[0]), "" if row[1] is None else str(row[1])] for row in values if row and str(row[0]).strip()]


def replace_text(rows: Any, find: str, replacement: str) -> Rows:
    if not find:
        return _clean(rows)
    return [[path, caption.replace(find, replacement)] for path, caption in _clean(rows)]


def add_trigger(rows: Any, trigger: str) -> Rows:
    """Puts the trigger word first in every caption that does not start with it already."""
    trigger = trigger.strip().strip(",").strip()
    if not trigger:
        return _clean(rows)
    return [[path, caption if split_tags(caption)[:1] == [trigger] else ", ".join([trigger, *split_tags(caption)])]
            for path, caption in _clean(rows)]


def remove_trigger(rows: Any, trigger: str) -> Rows:
    trigger = trigger.strip().strip(",").strip()
    return [[path, ", ".join(tag for tag in split_tags(caption) if tag != trigger)] for path, caption in _clean(rows)]


def tag_table(rows: Any) -> List[List[Any]]:
    """[[tag, count], ...] over the grid's captions, most frequent first: the counts ss_tag_frequency records
    (lower-cased, summed over subfolders)."""
    counts = count_tags(caption for _, caption in _clean(rows))
    return [[tag, count] for tag, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def tag_in_row(table: Any, row: int) -> str:
    """The tag in a row of tag_table's output (a DataFrame or lists), "" past its end."""
    values = table.values.tolist() if hasattr(table, "values") else table or []
    return str(values[row][0]) if 0 <= row < len(values) else ""


def images_with_tag(folder: str, rows: Any, tag: str) -> List[Tuple[str, str]]:
    """Gallery items (image path, caption) of the rows whose caption has the tag, in any case."""
    wanted, root = tag.strip().lower(), Path(folder)
    return [(str(_inside(root, path)), caption) for path, caption in _clean(rows)
            if wanted in {name.lower() for name in split_tags(caption)}]


def rename_tag(rows: Any, old: str, new: str) -> Rows:
    """Every caption's tag `old` (in any case) becomes `new`; an empty `new` removes it. A caption that then
    has a tag twice keeps the first."""
    old_key, new = old.strip().lower(), new.strip().strip(",").strip()
    renamed = []
    for path, caption in _clean(rows):
        tags = split_tags(caption)
        if old_key and old_key in {tag.lower() for tag in tags}:
            caption = ", ".join(_first_of_each(new if tag.lower() == old_key else tag for tag in tags))
        renamed.append([path, caption])
    return renamed


def _first_of_each(tags: Iterable[str]) -> List[str]:
    """The non-empty tags, each (compared in lower case) where it first occurs."""
    seen, kept = set(), []
    for tag in tags:
        if tag and tag.lower() not in seen:
            seen.add(tag.lower())
            kept.append(tag)
    return kept


def remove_tag(rows: Any, tag: str) -> Rows:
    return rename_tag(rows, tag, "")


def loaded_family(host: Host) -> Optional[str]:
    """The loaded checkpoint's family; None when none is loaded or it is not one this extension trains."""
    try:
        return host.checkpoint_facts().family
    except ValueError:  # HostError: no checkpoint loaded
        return None


def caption_suggestion(host: Host) -> Tuple[str, str]:
    """(markdown saying which caption model suits the loaded checkpoint and why, that model)."""
    try:
        facts = host.checkpoint_facts()
    except ValueError:  # HostError: no checkpoint loaded
        return "Load a checkpoint to get a caption model suggestion.", DEFAULT_MODEL
    model, why = suggest_caption_model(facts.family, facts.name, facts.metadata)
    return f"Suggested for **{html.escape(facts.name)}**: `{model}` ({html.escape(why)}).", model


def list_presets(folder: Path) -> List[str]:
    """The built-in presets first, then the user's saved ones."""
    saved = sorted(path.stem for path in Path(folder).glob("*.yaml") if path.stem not in BUILTIN_PRESETS)
    return [*BUILTIN_PRESETS, *saved]


def load_preset(folder: Path, name: str) -> TrainConfig:
    path = BUILTIN_PRESETS.get(name or "default") or Path(folder) / f"{name}.yaml"
    return load_config(path)


def preset_for(family: Optional[str]) -> str:
    """The built-in preset to start from for a model family (a key of models.families.FAMILIES, or None)."""
    return FAMILY_PRESETS.get(family, "default")


def save_preset(folder: Path, name: str, values: Dict[str, Dict[str, Any]]) -> str:
    name = name.strip()
    if not name or name in BUILTIN_PRESETS or any(c in name for c in '/\\:*?"<>|.'):
        raise ConfigError(f"preset name {name!r}: use a plain name (letters, digits, - and _), not "
                          f"{' or '.join(map(repr, BUILTIN_PRESETS))}")
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_config(config_from_dict(values), Path(folder) / f"{name}.yaml")
    return name


def estimate(config: TrainConfig, seconds_per_step: Optional[float]) -> str:
    """Steps, images and buckets for the settings, and the time when a step has been measured before."""
    dataset = load_dataset(config.data)
    train = config.training
    per_epoch, total = step_plan(dataset, train)
    buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(dataset.bucket_counts().items()))
    time = (f"about {total * seconds_per_step / 60:.1f} min at the last run's {seconds_per_step:.2f} s/step"
            if seconds_per_step else "time: shown once the first steps have run")
    return (f"**{total} steps** ({per_epoch} per epoch x {train.epochs} epochs"
            f"{', capped by max_train_steps' if train.max_train_steps else ''}); "
            f"{len(dataset.samples)} images, {sum(s.repeats for s in dataset.samples)} with repeats; "
            f"buckets {buckets}; {time}.")


def job_view(runner: JobRunner, kind: str) -> Dict[str, Any]:
    """The latest job of a kind as the tab shows it: a status line, losses, previews, the result."""
    job = runner.latest(kind)
    if job is None:
        return {"status": "No job yet.", "losses": [], "previews": [], "running": False, "status_raw": None}
    status = job.snapshot()
    line = status["message"] or status["state"]
    if status["state"] == "failed":
        line = f"**Failed:** {html.escape(in_words(status['error'] or ''))}"
        if status["advice"]:
            line += " Apply the suggested settings with the button below, then start again."
    elif status["state"] in ("done", "stopped"):
        line = f"**{status['state'].capitalize()}.** {html.escape(status['message'])}"
    elif job.stop_mode:
        line = f"**Stopping** ({'saving' if job.stop_mode == 'save' else 'discarding'} the LoRA): {line}"
    report = status.get("report") or {}
    previews = [(path, f"step {int(Path(path).stem.split('-')[-1])}") for path in report.get("previews", [])]
    return {"status": line, "losses": status["losses"], "previews": previews,
            "running": status["state"] == "running", "status_raw": status}


def result_markdown(status: Optional[Dict[str, Any]]) -> str:
    if not status or status["kind"] != "train" or status["state"] == "running":
        return ""
    report = status.get("report") or {}
    if not status.get("output"):
        return "Nothing was saved." if status["state"] != "failed" else ""
    check = report.get("verification") or {}
    return (f"Saved **{html.escape(status['output'])}** after {report.get('steps')} steps "
            f"({report.get('seconds')} s). The WebUI's Lora loader placed {check.get('matched')} of "
            f"{check.get('stems')} layers: {len(check.get('unmatched', []))} unmatched keys. "
            f"Logs: {html.escape(str(report.get('log_dir')))}")


def _tag_pattern(name: str) -> "re.Pattern":
    return re.compile(rf"<lora:{re.escape(name)}(:[^>]*)?>\s*,?\s*")


def with_lora(prompt: str, name: str, weight: float) -> str:
    """The prompt with <lora:name:weight> in front (replacing any tag of that LoRA already in it)."""
    return f"<lora:{name}:{weight:g}>, {without_lora(prompt, name)}".rstrip(", ")


def without_lora(prompt: str, name: str) -> str:
    return _tag_pattern(name).sub("", prompt).strip().strip(",").strip()


def infotext(prompt: str, seed: int, size: int, steps: int, sampler: str) -> str:
    """The generation parameters as the WebUI writes them under an image, which "Send to txt2img" reads."""
    return f"{prompt}\nSteps: {steps}, Sampler: {sampler}, CFG scale: 7, Seed: {seed}, Size: {size}x{size}"
