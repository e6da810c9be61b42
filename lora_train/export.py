"""kohya-format LoRA files: tensors, training metadata, atomic writes.

The tensors are the network's state dict (`<stem>.lora_down.weight`, `<stem>.lora_up.weight`, `<stem>.alpha`)
in the save precision. The metadata follows kohya sd-scripts (`ss_*`, `sshs_*`) and ModelSpec (`modelspec.*`)
so every loader shows the right base model: the WebUI hides a card whose `ss_base_model_version` it cannot
read; every value is valid UTF-8 (a folder name that is not becomes its bytes escaped, `caf\\xe9`). A file is
written under a temporary name with the user's umask (as any other file they create) and renamed into place;
an existing file is never replaced unless `overwrite` is set.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save as save_bytes

from . import __version__
from .config import TrainConfig
from .models.families import FAMILIES
from .runtime import autocast_dtype
from .schedule import effective_schedule

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MIXED_PRECISION_NAMES = {None: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}  # kohya's values


class OutputExistsError(FileExistsError):
    """The LoRA file exists and overwriting was not asked for."""


def tensor_data_hash(data: bytes) -> str:
    """sha256 of a serialized safetensors file's tensor data, after the header (kohya's sshs_model_hash)."""
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length:]).hexdigest()


def build_metadata(config: TrainConfig, model, network, dataset, steps: int, epoch: int,
                   comment: str = f"sd-webui-lora-train {__version__}") -> Dict[str, str]:
    """Training metadata as strings, kohya's keys, from what was built: a DiffusionModel, its LoRANetwork, a Dataset."""
    train, data, spec = config.training, config.data, network.spec
    schedule = effective_schedule(model, config)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": str(spec.alpha),
        "ss_network_dropout": str(spec.dropout),
        "ss_output_name": config.output.output_name,
        "ss_training_comment": comment,
        "ss_tag_frequency": json.dumps({_utf8(folder): tags for folder, tags in dataset.tag_frequency().items()},
                                       ensure_ascii=False),
        "ss_num_train_images": str(sum(s.repeats for s in dataset.samples)),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_learning_rate": str(train.learning_rate),
        "ss_text_encoder_lr": str(train.effective_text_encoder_lr if network.text_encoder_stems() else 0),
        "ss_unet_lr": str(train.learning_rate),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_optimizer": train.optimizer,
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_mixed_precision": MIXED_PRECISION_NAMES[autocast_dtype(train.mixed_precision, model.device)],
        "ss_noise_offset": str(train.noise_offset),
        "ss_min_snr_gamma": str(train.min_snr_gamma),
        "ss_zero_terminal_snr": str(schedule.zero_terminal_snr),
        "ss_seed": str(train.seed),
        "ss_network_train_unet_only": str(not network.text_encoder_stems()),
        "ss_sd_model_name": model.name,
        "ss_clip_skip": str(model.clip_skip),
        **_resolution(data, dataset),
    }
    if spec.conv_rank:
        metadata["ss_network_args"] = json.dumps({"conv_dim": spec.conv_rank, "conv_alpha": spec.conv_alpha})
    metadata = {**metadata, **FAMILIES[model.family].metadata(schedule.prediction), **_modelspec(config)}
    return {key: _utf8(value) for key, value in metadata.items()}


def _utf8(text: str) -> str:
    """The text as valid UTF-8: undecodable file-name bytes (held as surrogates) become escapes like \\xe9."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _resolution(data, dataset) -> Dict[str, str]:
    """ss_resolution and kohya's bucket keys: each bucket's size and image count (repeats included)."""
    buckets = {str(index): {"resolution": list(bucket), "count": count}
               for index, (bucket, count) in enumerate(dataset.bucket_counts().items())}
    return {"ss_resolution": f"({data.resolution}, {data.resolution})", "ss_enable_bucket": str(data.enable_bucket),
            "ss_min_bucket_reso": str(data.bucket_range[0]), "ss_max_bucket_reso": str(data.bucket_range[1]),
            "ss_bucket_info": json.dumps({"buckets": buckets})}


def _modelspec(config: TrainConfig) -> Dict[str, str]:
    resolution = config.data.resolution
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": config.output.output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }


def epoch_file_path(output, epoch: int) -> Path:
    """The LoRA file save_every_n_epochs writes after `epoch`, for an OutputConfig."""
    return Path(output.output_dir) / f"{output.output_name}-{epoch:06d}.safetensors"


def _file_bytes(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], precision: str) -> bytes:
    dtype = SAVE_DTYPES[precision]
    converted = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    model_hash = tensor_data_hash(save_bytes(converted, training_only))
    return save_bytes(converted, {**metadata, "sshs_model_hash": model_hash})


def serialized_size(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], precision: str) -> int:
    """The size in bytes of the file save_lora writes for these tensors and metadata."""
    return len(_file_bytes(tensors, metadata, precision))


def save_lora(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
              precision: str = "fp16", overwrite: bool = False) -> Path:
    """Writes a kohya .safetensors atomically (temp file in the same folder, then rename).

    Raises:
        OutputExistsError: the file exists and overwrite is False.
    """
    path = check_free(path, overwrite)
    data = _file_bytes(tensors, metadata, precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data, overwrite)
    return path


def _write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    """Writes a temp file beside path (mode 0666 less the umask, as open() would) and renames it into place."""
    temp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temp, path)
        else:
            _link_new(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _link_new(temp: str, path: Path) -> None:
    """Puts temp at path only if nothing is there (a file that appeared meanwhile is never clobbered)."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path} appeared while saving; it was left untouched") from None
    except OSError:  # a file system without hard links (FAT, some network shares)
        check_free(path, overwrite=False)
        os.replace(temp, path)


def check_free(path: Path, overwrite: bool) -> Path:
    """Raises OutputExistsError before training if the final file would be refused afterwards."""
    if os.path.exists(path) and not overwrite:  # a name the file system refuses is save_plan's to report
        raise OutputExistsError(f"{path} already exists; choose another output.output_name or set "
                                "output.overwrite: true")
    return Path(path)
