"""The command line's memory discipline on the tiny model: a file is read one tensor at a time (its stored copy is
never alive beside the cast weights), the UNet is read only after the caches are filled and the encoders are away,
the encoders are not read back at the end of a run (only when used again, then bit for bit), and none of it
changes what is trained."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_train.cli import main
from lora_train.models.diffusers import DiffusersModel, load_diffusers_model
from lora_train.models.safetensors_file import SafetensorsFile
from lora_train.pipeline import train_lora
from tests.test_training import make_config, write_yaml


@pytest.fixture(scope="module")
def fp16_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint halved, as users' files are stored, with its .yaml (and so its CLIP folder) beside it."""
    path = tmp_path_factory.mktemp("fp16") / tiny_checkpoint.name
    tensors = load_file(str(tiny_checkpoint))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(path))
    path.with_suffix(".yaml").write_text(tiny_checkpoint.with_suffix(".yaml").read_text())
    return path


def test_a_file_is_read_one_tensor_at_a_time_and_cast_as_it_is_read(fp16_checkpoint, monkeypatch):
    stored, alive_before_each_read = [], []
    read_stored = SafetensorsFile.read_stored

    def tracked(self, key):
        alive_before_each_read.append(sum(ref() is not None for ref in stored))
        tensor = read_stored(self, key)
        if tensor.dtype == torch.float16:  # integer buffers (position ids) are kept as they are
            stored.append(weakref.ref(tensor))
        return tensor
    monkeypatch.setattr(SafetensorsFile, "read_stored", tracked)
    model = load_diffusers_model(str(fp16_checkpoint), dtype=torch.float32)
    assert len(stored) > 100 and max(alive_before_each_read) == 0, "a stored fp16 tensor outlived its cast"
    for component in (model.unet, *model.encoders().values()):
        assert {p.dtype for p in component.parameters()} == {torch.float32}


def test_the_cli_reads_the_unet_after_the_caches_and_leaves_the_encoders_away(fp16_checkpoint, sample_images,
                                                                             tmp_path, monkeypatch):
    seen = []
    load_unet = DiffusersModel.load_unet

    def recorded(self):
        if self.deferred_unet is not None:
            encoders = [p for module in (self.vae, self.text_encoder) for p in module.parameters()]
            seen.append((self, all(p.numel() == 0 for p in encoders), all(p.is_meta for p in self.unet.parameters())))
        load_unet(self)
    monkeypatch.setattr(DiffusersModel, "load_unet", recorded)
    config = make_config(sample_images, fp16_checkpoint, tmp_path / "out", max_train_steps=2)
    config.model.train_text_encoder = False
    assert main(["train", "--config", write_yaml(config, tmp_path / "run.yaml")]) == 0
    [(model, encoders_away, unet_was_empty)] = seen
    assert encoders_away and unet_was_empty
    assert all(p.numel() == 0 for p in model.vae.parameters()), "the run's end read the encoders back"
    fresh = load_diffusers_model(str(fp16_checkpoint), dtype=torch.float32)
    for role, module in model.encoders().items():  # used again: brought back bit for bit
        expected = fresh.encoders()[role].state_dict()
        assert all(torch.equal(t, expected[name]) for name, t in module.state_dict().items()), role


def test_a_deferred_unet_trains_exactly_like_one_read_at_load(fp16_checkpoint, sample_images, tmp_path):
    losses = []
    for defer in (False, True):
        config = make_config(sample_images, fp16_checkpoint, tmp_path / f"out-{defer}", max_train_steps=3)
        config.model.train_text_encoder = False
        model = load_diffusers_model(str(fp16_checkpoint), dtype=torch.float32, defer_unet=defer)
        assert all(p.is_meta for p in model.unet.parameters()) == defer
        losses.append(train_lora(config, model).losses)
    assert losses[0] == losses[1] and len(losses[0]) == 3
