"""The settings form: one field per config key, built from the config dataclasses and the default YAML.

Each field's help text is its comment in `configs/lora_default.yaml`, so the form, the file and the docs say
the same thing. Keys the tab sets itself (the image folder, the base model, where files go) are not fields.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from ..config import (DEFAULT_CONFIG_PATH, LR_SCHEDULERS, MATMUL_PRECISION, MIXED_PRECISION, OPTIMIZERS,
                      PREDICTIONS, SAVE_PRECISION, SECTIONS, TrainConfig)

MANAGED = {"data.train_data_dir", "model.base_model", "output.output_dir", "output.logging_dir",
           "output.checkpoint_dir"}
CHOICES = {"training.lr_scheduler": LR_SCHEDULERS, "training.optimizer": OPTIMIZERS,
           "training.mixed_precision": MIXED_PRECISION, "training.matmul_precision": MATMUL_PRECISION,
           "output.save_precision": SAVE_PRECISION, "model.prediction": PREDICTIONS}
_COMMENTED_KEY = re.compile(r"^\s+(\w+):.*?#\s*(.+)$")
# What a first run needs, in this order, shown above the "Advanced" group that holds every other key.
BASIC = ("output.output_name", "training.epochs", "training.max_train_steps", "data.resolution", "model.lora_rank",
         "training.learning_rate", "model.train_text_encoder")
LABELS = {"data.min_bucket_reso": "Min bucket size", "data.max_bucket_reso": "Max bucket size",
          "model.lora_rank": "LoRA rank", "model.alpha": "LoRA alpha", "training.lr_scheduler": "LR scheduler",
          "training.lr_warmup_steps": "LR warmup steps", "training.text_encoder_lr": "Text encoder LR",
          "training.min_snr_gamma": "Min SNR gamma", "model.conv_rank": "Conv rank (LoCon)",
          "model.conv_alpha": "Conv alpha", "output.output_name": "Output name (the LoRA's file name)",
          "training.max_train_steps": "Max train steps (empty: epochs decide)"}
_KEY = re.compile(r"\b(data|model|training|output)\.(\w+)")
_SQUARE = re.compile(r"\b(\w+)\*\*2\b")


@dataclass
class Field:
    section: str
    name: str
    kind: str  # bool | int | float | str | choice; optional ones are shown as text, empty = not set
    optional: bool
    default: Any
    help: str
    choices: Tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def label(self) -> str:
        return label(self.key)

    @property
    def basic(self) -> bool:
        return self.key in BASIC


def label(key: str) -> str:
    """"data.min_bucket_reso" -> "Min bucket size": the name the form shows for a config key."""
    return LABELS.get(key) or key.split(".", 1)[1].replace("_", " ").capitalize()


def in_words(message: str) -> str:
    """A config error as people read it: labels first, each key after its label, no expressions.

    "data.min_bucket_reso: 128 is not valid; use a value >= 256" becomes
    "Min bucket size: 128 is not valid; use a value >= 256 (data.min_bucket_reso)".
    """
    message = _SQUARE.sub(lambda match: f"{match.group(1)} x {match.group(1)}", message)
    head = _KEY.match(message)
    rest = message[head.end():].lstrip(": ") if head and message[head.end():].startswith(":") else None
    if rest is None:
        return _KEY.sub(lambda match: f"{label(match.group(0))} ({match.group(0)})", message)
    named = _KEY.sub(lambda match: f"{label(match.group(0))} ({match.group(0)})", rest)
    if head.group(0) in rest:  # the message names its key where it says what to change
        return named[:1].upper() + named[1:]
    return f"{label(head.group(0))}: {named} ({head.group(0)})"


def yaml_comments() -> Dict[str, str]:
    """{"section.key": its comment} from the default YAML."""
    comments, section = {}, ""
    for line in DEFAULT_CONFIG_PATH.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\w+:", line):
            section = line.split(":", 1)[0]
        match = _COMMENTED_KEY.match(line)
        if match and section:
            comments[f"{section}.{match.group(1)}"] = match.group(2).strip()
    return comments


def form_fields() -> List[Field]:
    comments, defaults, fields = yaml_comments(), TrainConfig(), []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            key = f"{section}.{item.name}"
            if key in MANAGED:
                continue
            annotation = hints[item.name]
            optional = typing.get_origin(annotation) is typing.Union
            base = typing.get_args(annotation)[0] if optional else annotation
            kind = "choice" if key in CHOICES else base.__name__
            fields.append(Field(section, item.name, kind, optional, getattr(getattr(defaults, section), item.name),
                                comments.get(key, ""), CHOICES.get(key, ())))
    return fields


def to_form(field: Field, value: Any) -> Any:
    """The value as its form component shows it (optional values as text, empty when unset)."""
    if field.optional:
        return "" if value is None else str(value)
    return value


def from_form(field: Field, value: Any) -> Any:
    """The form's value as the config takes it; errors are left to the config's own checks."""
    if field.optional:
        text = str(value if value is not None else "").strip()
        return _number(text, field.kind) if text else None
    if field.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def values_to_dict(fields: List[Field], values: List[Any]) -> Dict[str, Dict[str, Any]]:
    """Nested config dict from the form values, in the order of `fields`."""
    config: Dict[str, Dict[str, Any]] = {section: {} for section in SECTIONS}
    for field, value in zip(fields, values):
        config[field.section][field.name] = from_form(field, value)
    return config


def config_to_values(fields: List[Field], config: TrainConfig) -> List[Any]:
    return [to_form(field, getattr(getattr(config, field.section), field.name)) for field in fields]


def basic_first(fields: List[Field]) -> List[Field]:
    """The BASIC fields in their order, then the others in config order: the order the form shows them."""
    by_key = {field.key: field for field in fields}
    return [by_key[key] for key in BASIC] + [field for field in fields if not field.basic]


def advised_values(fields: List[Field], advice: Dict[str, Any]) -> Dict[str, Any]:
    """{"section.key": form value} for the advised settings ({"training.batch_size": 2}) that are form fields."""
    return {field.key: to_form(field, advice[field.key]) for field in fields if field.key in advice}


def _number(text: str, kind: str) -> Any:
    """int/float from form text; text that is no number goes on to the config, whose error names the key."""
    parse = {"int": int, "float": float}.get(kind)
    if parse is None:
        return text
    try:
        return parse(text)
    except ValueError:
        return text
