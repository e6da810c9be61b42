"""Shared fixtures: tiny SD1- and SD2-topology checkpoints and a tiny SDXL built once per session, and small
image folders."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from lora_train.cli_demo import make_sample_dataset  # noqa: E402
from lora_train.tiny import build_tiny_checkpoint, build_tiny_ldm  # noqa: E402
from tiny_sd2 import build_tiny_sd2_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """tiny-sd1.safetensors with its .yaml beside it (eps-prediction)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_v_checkpoint(tmp_path_factory) -> Path:
    """The same topology, v-prediction."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("models-v"), name="tiny-sd1-v", v_prediction=True)


@pytest.fixture(scope="session")
def tiny_sd2_checkpoint(tmp_path_factory):
    """(tiny-sd2-v.safetensors with its .yaml beside it, the ldm model it was saved from: not to be changed)."""
    return build_tiny_sd2_checkpoint(tmp_path_factory.mktemp("sd2"))


@pytest.fixture
def tiny_ldm(tiny_checkpoint):
    """A real ldm LatentDiffusion as the WebUI holds it, with the checkpoint's weights."""
    from safetensors.torch import load_file

    config = yaml.safe_load(tiny_checkpoint.with_suffix(".yaml").read_text())
    model = build_tiny_ldm(config, seed=0)
    model.load_state_dict(load_file(str(tiny_checkpoint)))
    return model


@pytest.fixture
def sample_images(tmp_path) -> Path:
    return make_sample_dataset(tmp_path / "images")


@pytest.fixture(scope="session")
def _pristine_tiny_sdxl():
    from lora_train.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(seed=0)


@pytest.fixture
def tiny_sdxl(_pristine_tiny_sdxl):
    """A fresh copy of the tiny SDXL (sgm layout) for each test, as built: not yet as the WebUI holds it."""
    return copy.deepcopy(_pristine_tiny_sdxl)
