"""Caching and memory: cached and uncached runs train identically, stale cache entries are never read, offloaded
modules come back bit for bit, and the preflight tells a configuration that fits from one that does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from safetensors import safe_open

from lora_train.cli import main
from lora_train.dataset import load_dataset
from lora_train.jobs import JobRunner
from lora_train.models import SizeInfo
from lora_train.encode_cache import LatentCache, TextCache
from lora_train.runtime import Offloader
from lora_train.models.diffusers import load_diffusers_model
from lora_train.pipeline import train_lora
from lora_train.preflight import GIB, MemoryPreflightError, estimate_memory, preflight
from tests.test_training import make_config, write_yaml

UNCACHED = dict(cache_latents=False, cache_text_encoder_outputs=False)


def run(images, checkpoint, out, **training):
    config = make_config(images, checkpoint, out, epochs=1, **training)
    config.model.train_text_encoder, config.model.dropout = False, 0.1  # dropout: the global RNG must line up
    config.data.flip_aug, config.data.caption_dropout, config.output.overwrite = True, 0.3, True
    model = load_diffusers_model(str(checkpoint))
    return train_lora(config, model), model


def test_cached_and_uncached_runs_give_the_same_losses(tiny_checkpoint, sample_images, tmp_path):
    cached, _ = run(sample_images, tiny_checkpoint, tmp_path / "a", batch_size=2)
    uncached, _ = run(sample_images, tiny_checkpoint, tmp_path / "b", batch_size=2, **UNCACHED)
    assert cached.losses == uncached.losses and len(cached.losses) == 4


def test_disk_cache_is_reused_and_a_changed_image_gets_a_new_entry(tiny_checkpoint, sample_images, tmp_path):
    first, model = run(sample_images, tiny_checkpoint, tmp_path / "out", cache_latents_to_disk=True)
    folder = tmp_path / "out" / "latent_cache"
    before = {path.name for path in folder.iterdir()}
    assert len(before) == 16  # 8 images x 2 flips
    changed = sorted(sample_images.glob("*.png"))[0]
    Image.new("RGB", Image.open(changed).size, (0, 0, 0)).save(changed)
    second, _ = run(sample_images, tiny_checkpoint, tmp_path / "out", cache_latents_to_disk=True)
    after = {path.name for path in folder.iterdir()}
    assert len(after - before) == 2 and before <= after  # the changed image's two flips; the rest reused
    uncached, _ = run(sample_images, tiny_checkpoint, tmp_path / "fresh", **UNCACHED)
    assert second.losses == uncached.losses != first.losses


def test_a_changed_caption_is_encoded_again(tiny_checkpoint, sample_images):
    model = load_diffusers_model(str(tiny_checkpoint))
    cache, size = TextCache(model, store=True), SizeInfo.square(64)
    old, new = cache.encode(["a red circle"], [size]), cache.encode(["a blue square"], [size])
    assert not torch.equal(old.crossattn, new.crossattn)
    expected = model.encode_prompts(["a blue square"], [size]).crossattn
    torch.testing.assert_close(new.crossattn, expected, rtol=0, atol=0)


def test_latent_key_follows_the_file_bytes_and_bucket(tiny_checkpoint, sample_images, tmp_path):
    from lora_train.config import DataConfig

    dataset = load_dataset(DataConfig(train_data_dir=str(sample_images), resolution=64, min_bucket_reso=64))
    cache = LatentCache(load_diffusers_model(str(tiny_checkpoint)), dataset, store=False)
    assert cache.key(0, False) != cache.key(0, True) != cache.key(1, False)
    torch.testing.assert_close(cache.encode(0, False), cache.encode(0, False), rtol=0, atol=0)


def test_offloaded_modules_come_back_bit_for_bit(tiny_checkpoint):
    vae = load_diffusers_model(str(tiny_checkpoint)).vae
    before = {name: tensor.clone() for name, tensor in vae.state_dict().items()}
    parameters = list(vae.parameters())
    with Offloader([vae], torch.device("cpu")):
        assert all(p.numel() == 0 for p in vae.parameters())
    assert all(a is b for a, b in zip(parameters, vae.parameters()))
    for name, tensor in vae.state_dict().items():
        assert torch.equal(tensor, before[name]) and tensor.dtype == before[name].dtype, name


def test_preflight_flags_a_config_that_cannot_fit_and_accepts_one_that_can(tiny_checkpoint, sample_images,
                                                                            tmp_path):
    model = load_diffusers_model(str(tiny_checkpoint))
    config = make_config(sample_images, tiny_checkpoint, tmp_path, batch_size=8, resolution=512)
    per_pixel = 200_000.0  # bytes saved per latent pixel (an SD1.5-sized UNet is ~this order)
    big = preflight(model, config, (512, 512), 1_000_000, budget=4 * GIB, per_pixel=per_pixel)
    assert not big.fits and big.changes["training.gradient_checkpointing"] is True
    assert "does not fit; set training.gradient_checkpointing: True" in big.message()
    assert preflight(model, config, (512, 512), 1_000_000, budget=64 * GIB, per_pixel=per_pixel).fits
    hopeless = preflight(model, config, (512, 512), 1_000_000, budget=GIB // 4, per_pixel=per_pixel)
    assert not hopeless.fits and not hopeless.changes and "larger GPU" in hopeless.message()


def test_probe_measures_activations_that_grow_with_the_batch(tiny_checkpoint, sample_images, tmp_path):
    from lora_train.preflight import activation_bytes_per_pixel

    model = load_diffusers_model(str(tiny_checkpoint))
    per_pixel = activation_bytes_per_pixel(model)
    assert per_pixel > 0
    config = make_config(sample_images, tiny_checkpoint, tmp_path, batch_size=1)
    one = estimate_memory(model, config, (64, 64), 1000, per_pixel)
    config.training.batch_size = 4
    four = estimate_memory(model, config, (64, 64), 1000, per_pixel)
    assert four.activations == pytest.approx(4 * one.activations, rel=1e-6) and four.weights == one.weights


def test_suspended_brings_offloaded_modules_back_for_a_moment(tiny_checkpoint):
    vae = load_diffusers_model(str(tiny_checkpoint)).vae
    before = {name: tensor.clone() for name, tensor in vae.state_dict().items()}
    with Offloader([vae], torch.device("cpu")) as offloader:
        with offloader.suspended():  # e.g. a preview image in the middle of training
            assert all(torch.equal(t, before[n]) for n, t in vae.state_dict().items())
        assert all(p.numel() == 0 for p in vae.parameters())
    assert all(torch.equal(t, before[n]) for n, t in vae.state_dict().items())


def test_a_truncated_offload_file_is_an_error_not_silently_wrong_weights(tiny_checkpoint):
    vae = load_diffusers_model(str(tiny_checkpoint)).vae
    offloader = Offloader([vae], torch.device("cpu"))
    offloader.offload()
    spilled = next(Path(offloader._folder.name).iterdir())
    spilled.write_bytes(spilled.read_bytes()[:-4])
    with pytest.raises(OSError, match="truncated"):
        offloader.restore()


def _preflight_that_fits_batch(size: int):
    """A stand-in for the GPU check: settings with a batch above `size` do not fit."""
    def check(_model, config, _bucket, _adapters):
        if config.training.batch_size > size:
            raise MemoryPreflightError(f"does not fit; set training.batch_size: {size}",
                                       {"training.batch_size": size, "training.gradient_checkpointing": True})
    return check


def test_cli_names_the_advice_and_applies_it_when_asked(tiny_checkpoint, sample_images, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.setattr("lora_train.pipeline.check_device_memory", _preflight_that_fits_batch(2))
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", batch_size=4, epochs=1)
    path = write_yaml(config, tmp_path / "run.yaml")
    assert main(["train", "--config", path]) == 2
    assert "set training.batch_size: 2 (or rerun with --apply-advice)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "test_lora.safetensors").exists()
    assert main(["train", "--config", path, "--apply-advice"]) == 0
    printed = capsys.readouterr()
    assert "memory: applying training.batch_size: 2, training.gradient_checkpointing: True" in printed.err
    assert "training done: 4/4 steps" in printed.out  # 8 images at batch 2
    with safe_open(str(tmp_path / "out" / "test_lora.safetensors"), "pt") as file:
        assert file.metadata()["ss_batch_size_per_device"] == "2"


def test_a_failed_job_carries_the_advice():
    job = JobRunner().start("train", lambda job: (_ for _ in ()).throw(
        MemoryPreflightError("does not fit", {"training.batch_size": 1})))
    assert job.done.wait(10)
    status = job.snapshot()
    assert status["state"] == "failed" and status["advice"] == {"training.batch_size": 1}


def test_running_out_of_memory_mid_run_restores_the_model_and_names_the_changes(tiny_checkpoint, sample_images,
                                                                                tmp_path):
    from lora_train.pipeline import TrainingOutOfMemoryError

    config = make_config(sample_images, tiny_checkpoint, tmp_path, batch_size=4, epochs=2)
    model = load_diffusers_model(str(tiny_checkpoint))
    before = {name: tensor.clone() for name, tensor in model.vae.state_dict().items()}

    def out_of_memory(event, trainer):
        if event == "step" and trainer.position.step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(TrainingOutOfMemoryError, match="ran out of memory at step 3") as raised:
        train_lora(config, model, callbacks=[out_of_memory])
    assert raised.value.changes == {"training.gradient_checkpointing": True, "training.batch_size": 1}
    assert all(torch.equal(t, before[n]) for n, t in model.vae.state_dict().items()), "offloaded VAE is back"
    assert model.unet.conv_in.weight.is_contiguous() and not config.output.lora_path.exists()


def test_offloaded_weights_come_back_in_their_memory_order():
    conv = torch.nn.Conv2d(4, 8, 3)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)  # --opt-channelslast
    conv.scale = torch.nn.Parameter(torch.tensor(2.5))  # a 0-dim weight, as OpenCLIP's logit_scale
    conv.register_buffer("sliced", torch.arange(12.0).view(3, 4)[:, :2])  # not one dense block
    before = {name: tensor.detach().clone() for name, tensor in conv.state_dict().items()}
    with Offloader([conv], torch.device("cpu")):
        assert conv.weight.numel() == 0 and conv.scale.numel() == 0
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert all(torch.equal(tensor, before[name]) for name, tensor in conv.state_dict().items())


def test_a_disk_that_refuses_the_offload_leaves_every_module_in_memory(tiny_checkpoint, monkeypatch, caplog):
    import lora_train.runtime as runtime

    model = load_diffusers_model(str(tiny_checkpoint))
    before = [{n: t.clone() for n, t in m.state_dict().items()} for m in (model.vae, model.text_encoder)]
    written = []

    def disk_full_on_the_second(module, path):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        return spill(module, path)
    spill = runtime._to_file
    monkeypatch.setattr(runtime, "_to_file", disk_full_on_the_second)
    with Offloader([model.vae, model.text_encoder], torch.device("cpu")) as offloader:
        assert not offloader.away and written, "the first module was written, then brought back"
        for module, saved in zip((model.vae, model.text_encoder), before):
            assert all(torch.equal(t, saved[n]) for n, t in module.state_dict().items())
    assert "could not be moved out ([Errno 28] No space left on device)" in caplog.text


def test_encoders_that_cannot_leave_the_gpu_stay_and_training_goes_on(caplog):
    calls = []

    class Refusing(torch.nn.Linear):  # the host has no RAM left for it when it is moved out
        refused = False

        def to(self, where):
            if not self.refused:
                self.refused = True
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
            calls.append(("second", str(where)))
            return self
    first, second = torch.nn.Linear(2, 2), Refusing(2, 2)
    first.to = lambda where: calls.append(("first", str(where))) or first
    with Offloader([first, second], torch.device("cuda")) as offloader:
        assert not offloader.away
    # moved out, then both sent back where they were (in this test, the CPU)
    assert calls == [("first", "cpu"), ("first", "cpu"), ("second", "cpu")]
    assert "could not be moved out (DefaultCPUAllocator: can't allocate memory)" in caplog.text
