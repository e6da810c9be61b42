"""kohya-format LoRA files: tensors, training metadata, atomic writes.

The tensors are the network's state dict (`<stem>.lora_down.weight`, `<stem>.lora_up.weight`, `<stem>.alpha`)
in the save precision. The metadata follows kohya sd-scripts (`ss_*`, `sshs_*`) and ModelSpec (`modelspec.*`)
so every loader shows the right base model: the WebUI hides a card whose `ss_base_model_version` it cannot
read. A file is written under a temporary name and renamed into place; an existing file is never replaced
unless `overwrite` is set.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save as save_bytes

from .config import TrainConfig
from .models import base_model_version

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODELSPEC_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                          "sd2_v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}


class OutputExistsError(FileExistsError):
    """The LoRA file exists and overwriting was not asked for."""


def tensor_data_hash(data: bytes) -> str:
    """sha256 of a serialized safetensors file's tensor data, after the header (kohya's sshs_model_hash)."""
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length:]).hexdigest()


def build_metadata(config: TrainConfig, model, dataset, steps: int, epoch: int,
                   comment: str = "") -> Dict[str, str]:
    """Training metadata as strings, kohya's keys; `model` is a DiffusionModel, `dataset` a Dataset."""
    family, prediction = model.family, model.prediction
    train, net, data = config.training, config.model, config.data
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(net.lora_rank),
        "ss_network_alpha": str(net.alpha),
        "ss_network_dropout": str(net.dropout),
        "ss_base_model_version": base_model_version(family, prediction),
        "ss_v2": str(family == "sd2"),
        "ss_output_name": config.output.output_name,
        "ss_training_comment": comment,
        "ss_tag_frequency": json.dumps(dataset.tag_frequency(), ensure_ascii=False),
        "ss_num_train_images": str(sum(s.repeats for s in dataset.samples)),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_learning_rate": str(train.learning_rate),
        "ss_text_encoder_lr": str(train.effective_text_encoder_lr if net.train_text_encoder else 0),
        "ss_unet_lr": str(train.learning_rate),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_optimizer": train.optimizer,
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_mixed_precision": train.mixed_precision,
        "ss_noise_offset": str(train.noise_offset),
        "ss_min_snr_gamma": str(train.min_snr_gamma),
        "ss_seed": str(train.seed),
        "ss_resolution": f"({data.resolution}, {data.resolution})",
        "ss_enable_bucket": str(data.enable_bucket),
        "ss_network_train_unet_only": str(not net.train_text_encoder),
        "ss_sd_model_name": model.name,
        "ss_clip_skip": str(getattr(model, "clip_skip", 1)),
    }
    if net.conv_rank:
        metadata["ss_network_args"] = json.dumps({"conv_dim": net.conv_rank, "conv_alpha": net.conv_alpha})
    return {**metadata, **_modelspec(config, family, prediction)}


def _modelspec(config: TrainConfig, family: str, prediction: str) -> Dict[str, str]:
    arch = MODELSPEC_ARCHITECTURE["sd2_v" if family == "sd2" and prediction == "v_prediction" else family]
    resolution = config.data.resolution
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": config.output.output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }


def save_lora(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
              precision: str = "fp16", overwrite: bool = False) -> Path:
    """Writes a kohya .safetensors atomically (temp file in the same folder, then rename).

    Raises:
        OutputExistsError: the file exists and overwrite is False.
    """
    path = check_free(path, overwrite)
    dtype = SAVE_DTYPES[precision]
    converted = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    model_hash = tensor_data_hash(save_bytes(converted, training_only))
    data = save_bytes(converted, {**metadata, "sshs_model_hash": model_hash})
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data, overwrite)
    return path


def _write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    if Path(path).exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output.output_name or set "
                                "output.overwrite: true")
    return Path(path)
