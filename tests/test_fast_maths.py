"""Speed settings change speed, never results: channels-last weights and the fp32 matmul precision hold for the
run only and are put back exactly; channels-last training gives the same losses as the default memory order."""

from __future__ import annotations

import pytest
import torch

from lora_train.runtime import channels_last, float32_matmul_precision
from lora_train.models.diffusers import load_diffusers_model
from lora_train.pipeline import train_lora
from tests.test_training import make_config


def test_channels_last_holds_for_the_run_and_puts_each_weight_back():
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 8))
    model[1].weight.data = model[1].weight.data.contiguous(memory_format=torch.channels_last)  # --opt-channelslast
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with channels_last(model):
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not model[0].weight.is_contiguous()
    assert model[0].weight.is_contiguous()
    assert model[1].weight.is_contiguous(memory_format=torch.channels_last) and not model[1].weight.is_contiguous()
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_channels_last_is_put_back_when_the_run_fails():
    conv = torch.nn.Conv2d(4, 8, 3)
    with pytest.raises(RuntimeError, match="boom"), channels_last(conv):
        raise RuntimeError("boom")
    assert conv.weight.is_contiguous()


def test_matmul_precision_holds_for_the_run_and_the_process_setting_comes_back():
    saved = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as the WebUI sets it at start-up
    try:
        outer = torch.get_float32_matmul_precision()
        with float32_matmul_precision("medium"):
            assert torch.get_float32_matmul_precision() == "medium"
        with float32_matmul_precision("default"):
            assert torch.get_float32_matmul_precision() == outer and torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == outer and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]


def run(images, checkpoint, out, **training):
    model = load_diffusers_model(str(checkpoint))
    seen = []
    result = train_lora(make_config(images, checkpoint, out, epochs=1, **training), model, callbacks=[
        lambda event, trainer: seen.append((torch.get_float32_matmul_precision(),
                                            model.unet.conv_in.weight.is_contiguous())) if event == "step" else None])
    return result, seen, model


def test_channels_last_trains_to_the_same_losses(tiny_checkpoint, sample_images, tmp_path):
    plain, plain_seen, _ = run(sample_images, tiny_checkpoint, tmp_path / "a", channels_last=False)
    fast, fast_seen, model = run(sample_images, tiny_checkpoint, tmp_path / "b", matmul_precision="medium")
    assert plain_seen[0] == ("highest", True) and fast_seen[0] == ("medium", False)
    assert len(fast.losses) == 2 and fast.losses == pytest.approx(plain.losses, rel=1e-4)
    assert model.unet.conv_in.weight.is_contiguous() and torch.get_float32_matmul_precision() == "highest"


def test_compiled_training_gives_the_eager_losses(tiny_checkpoint, sample_images, tmp_path):
    eager, _, _ = run(sample_images, tiny_checkpoint, tmp_path / "a")
    compiled, _, _ = run(sample_images, tiny_checkpoint, tmp_path / "b", compile=True)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
