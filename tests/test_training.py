"""End-to-end training on tiny models: the CLI on a checkpoint file, the ldm path on a live model (restored
exactly afterwards), resume exactness, stop modes, determinism and gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from host_state import assert_same_model, snapshot
from lora_train.cli import main
from lora_train.config import DataConfig, TrainConfig
from lora_train.models.conditioning import Cond
from lora_train.models.diffusers import load_diffusers_model
from lora_train.models.ldm import LdmModel
from lora_train.pipeline import train_lora

FAST = dict(batch_size=4, learning_rate=3e-3, lr_scheduler="constant", epochs=2)


def make_config(images, checkpoint, out, resolution=64, **training) -> TrainConfig:
    config = TrainConfig(data=DataConfig(train_data_dir=str(images), resolution=resolution, min_bucket_reso=64,
                                         max_bucket_reso=256))
    config.model.base_model, config.model.lora_rank, config.model.alpha = str(checkpoint), 4, 4.0
    for key, value in {**FAST, **training}.items():
        setattr(config.training, key, value)
    config.output.output_dir, config.output.output_name = str(out), "test_lora"
    return config.validate(require_base_model=bool(checkpoint))


def write_yaml(config: TrainConfig, path) -> str:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return str(path)


def scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_cli_trains_a_checkpoint_file_and_loss_decreases(tiny_checkpoint, sample_images, tmp_path, capsys):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", epochs=20)
    assert main(["train", "--config", write_yaml(config, tmp_path / "run.yaml")]) == 0
    printed = capsys.readouterr().out
    lora = tmp_path / "out" / "test_lora.safetensors"
    assert f"LoRA:        {lora}" in printed and "training done: 40/40 steps" in printed
    losses = scalars(tmp_path / "out" / "logs", "loss")
    assert len(losses) == 40 and len(scalars(tmp_path / "out" / "logs", "lr/unet")) == 40
    quarter = len(losses) // 4
    assert sum(losses[-quarter:]) < 0.95 * sum(losses[:quarter]), losses
    with safe_open(str(lora), "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_steps"] == "40" and metadata["ss_epoch"] == "20"
    assert metadata["ss_sd_model_name"] == "tiny-sd1" and metadata["ss_base_model_version"] == "sd_v1"


def test_dry_run_prints_plan_without_training(tiny_checkpoint, sample_images, tmp_path, capsys):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", epochs=3)
    assert main(["train", "--config", write_yaml(config, tmp_path / "run.yaml"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "8 usable images" in printed and "64x64: 8" in printed
    assert "optimizer steps per epoch x 3 epochs -> 6 steps" in printed
    assert not (tmp_path / "out").exists()


def test_ldm_model_trains_in_place_and_is_restored_exactly(tiny_ldm, sample_images, tmp_path):
    for parameter in tiny_ldm.model.parameters():
        parameter.requires_grad_(True)  # the WebUI leaves its UNet unfrozen
    before = snapshot(tiny_ldm)
    # 128 px: the middle block then attends over 2x2 tokens (at 1 token its attn1 q/k get no gradient)
    config = make_config(sample_images, "", tmp_path / "out", resolution=128, gradient_checkpointing=True,
                         max_train_steps=3)
    torch.manual_seed(99)
    expected_draw = torch.rand(2)
    torch.manual_seed(99)
    result = train_lora(config, LdmModel(tiny_ldm, name="tiny-ldm"))
    assert torch.equal(torch.rand(2), expected_draw), "the host's RNG stream is untouched"
    assert result.state == "done" and result.steps == 3
    assert_same_model(tiny_ldm, before)
    tensors = load_file(str(result.lora_path))
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert all(v.abs().sum() > 0 for v in ups), "every adapter (inside ldm's checkpointed blocks too) learned"


def test_ldm_v_prediction_trains(tiny_v_checkpoint, sample_images, tmp_path):
    from lora_train.tiny import build_tiny_ldm

    model = build_tiny_ldm(yaml.safe_load(tiny_v_checkpoint.with_suffix(".yaml").read_text()), seed=0)
    config = make_config(sample_images, "", tmp_path / "out", max_train_steps=2)
    adapter = LdmModel(model)
    assert adapter.prediction == "v_prediction"
    result = train_lora(config, adapter)
    with safe_open(str(result.lora_path), "pt") as file:
        assert file.metadata()["modelspec.prediction_type"] == "v"


def final_tensors(result):
    return load_file(str(result.lora_path))


def test_resumed_run_matches_an_uninterrupted_one(tiny_checkpoint, sample_images, tmp_path):
    model = load_diffusers_model(str(tiny_checkpoint))
    straight = train_lora(make_config(sample_images, tiny_checkpoint, tmp_path / "a", epochs=3,
                                      gradient_accumulation_steps=2, batch_size=2, lr_scheduler="cosine"), model)
    first = make_config(sample_images, tiny_checkpoint, tmp_path / "b", epochs=3, gradient_accumulation_steps=2,
                        batch_size=2, lr_scheduler="cosine")
    first.output.save_steps = 4
    stopper = lambda event, trainer: trainer.request_stop("discard") if trainer.position.step == 5 else None  # noqa
    assert train_lora(first, model, callbacks=[stopper]).state == "discarded"
    resumed_config = make_config(sample_images, tiny_checkpoint, tmp_path / "b", epochs=3,
                                 gradient_accumulation_steps=2, batch_size=2, lr_scheduler="cosine",
                                 resume_from_checkpoint=str(tmp_path / "b" / "checkpoints" / "test_lora-step000004"))
    resumed = train_lora(resumed_config, model)
    assert resumed.steps == straight.steps == 6
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    expected = final_tensors(straight)
    for key, value in final_tensors(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-3, atol=1e-5)


def test_resume_with_other_settings_is_refused(tiny_checkpoint, sample_images, tmp_path, capsys):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "a", max_train_steps=2)
    config.output.save_steps = 2
    train_lora(config, load_diffusers_model(str(tiny_checkpoint)))
    changed = make_config(sample_images, tiny_checkpoint, tmp_path / "b", batch_size=2,
                          resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "test_lora-step000002"))
    assert main(["train", "--config", write_yaml(changed, tmp_path / "r.yaml")]) == 2
    assert "batch_size: 4 -> 2" in capsys.readouterr().err


def test_stop_and_save_writes_what_was_learned_so_far(tiny_checkpoint, sample_images, tmp_path):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", epochs=10)
    stop = lambda event, trainer: trainer.request_stop("save") if trainer.position.step == 3 else None  # noqa
    result = train_lora(config, load_diffusers_model(str(tiny_checkpoint)), callbacks=[stop])
    assert result.state == "stopped" and result.steps == 3
    with safe_open(str(result.lora_path), "pt") as file:
        assert file.metadata()["ss_steps"] == "3"


def test_stop_and_discard_writes_no_lora(tiny_checkpoint, sample_images, tmp_path):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", epochs=10)
    stop = lambda event, trainer: trainer.request_stop("discard")  # noqa: E731
    result = train_lora(config, load_diffusers_model(str(tiny_checkpoint)), callbacks=[stop])
    assert result.state == "discarded" and result.lora_path is None
    assert not config.output.lora_path.exists()


def test_same_seed_same_lora_and_checkpointing_changes_nothing(tiny_checkpoint, sample_images, tmp_path):
    model = load_diffusers_model(str(tiny_checkpoint))
    options = dict(max_train_steps=3, noise_offset=0.05, min_snr_gamma=5.0)
    plain = train_lora(make_config(sample_images, tiny_checkpoint, tmp_path / "a", **options), model)
    again = train_lora(make_config(sample_images, tiny_checkpoint, tmp_path / "b", **options), model)
    checkpointed = train_lora(make_config(sample_images, tiny_checkpoint, tmp_path / "c",
                                          gradient_checkpointing=True, **options), model)
    assert plain.losses == again.losses
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
    for key, value in final_tensors(again).items():
        assert torch.equal(value, final_tensors(plain)[key])


def test_epoch_files_and_checkpoints_are_written(tiny_checkpoint, sample_images, tmp_path):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", epochs=3)
    config.output.save_every_n_epochs, config.output.save_steps = 1, 3
    result = train_lora(config, load_diffusers_model(str(tiny_checkpoint)))
    assert [p.name for p in result.epoch_files] == ["test_lora-000001.safetensors", "test_lora-000002.safetensors"]
    assert [p.name for p in result.checkpoints] == ["test_lora-step000003", "test_lora-step000006"]
    state = json.loads((result.checkpoints[0] / "state.json").read_text())
    assert state["position"]["step"] == 3


def test_existing_lora_stops_the_run_before_training(tiny_checkpoint, sample_images, tmp_path, capsys):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out")
    config.output.lora_path.parent.mkdir(parents=True)
    config.output.lora_path.write_bytes(b"an earlier LoRA")
    assert main(["train", "--config", write_yaml(config, tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "already exists" in err[-1]
    assert config.output.lora_path.read_bytes() == b"an earlier LoRA"


class InfiniteGradients:
    """Trainer callback: at the start, makes one adapter's gradient infinite for the first `times` backwards."""

    def __init__(self, times: int):
        self.times = times

    def __call__(self, event, trainer):
        if event == "start":
            parameter = next(iter(trainer.network.parameters()))
            parameter.register_hook(self._poison)

    def _poison(self, grad):
        if self.times:
            self.times -= 1
            return grad * float("inf")
        return grad


def test_a_step_with_infinite_gradients_is_skipped_not_applied(tiny_checkpoint, sample_images, tmp_path):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=4)
    result = train_lora(config, load_diffusers_model(str(tiny_checkpoint)), callbacks=[InfiniteGradients(1)])
    assert result.state == "done" and result.skipped_steps == 1
    assert all(torch.isfinite(v).all() for v in final_tensors(result).values())


def test_gradients_infinite_three_steps_in_a_row_stop_the_run(tiny_checkpoint, sample_images, tmp_path):
    from lora_train.trainer import TrainingDivergedError

    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=6)
    with pytest.raises(TrainingDivergedError, match="not finite for 3 steps in a row"):
        train_lora(config, load_diffusers_model(str(tiny_checkpoint)), callbacks=[InfiniteGradients(10)])
    assert not config.output.lora_path.exists()


@pytest.mark.parametrize("train_text_encoder, adapters_only, fix, changes", [
    (True, True, "its adapters diverged; lower training.text_encoder_lr (e.g. to 0.000125)",
     {"training.text_encoder_lr": 0.000125}),
    (True, False, "the checkpoint's own text encoder fails on them too (not the adapters)", {}),
    (False, False, "the checkpoint's own text encoder fails on them too", {})])
def test_a_text_encoder_giving_nan_says_which_part_failed_and_the_fix(tiny_checkpoint, sample_images, tmp_path,
                                                                       train_text_encoder, adapters_only, fix, changes):
    """A NaN only with the adapters on is theirs; one the checkpoint gives alone is the captions'."""
    from lora_train.trainer import TrainingDivergedError

    model, trainers = load_diffusers_model(str(tiny_checkpoint)), []
    encode = model.encode_prompts

    def poisoned(captions, sizes):
        adapters_on = trainers[0].network.multiplier != 0
        return Cond(encode(captions, sizes).crossattn * (float("nan") if adapters_on or not adapters_only else 1))

    model.encode_prompts = poisoned
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=2)
    config.model.train_text_encoder = train_text_encoder
    config.training.cache_text_encoder_outputs = False
    config.training.learning_rate = 5e-4
    with pytest.raises(TrainingDivergedError, match=r"text encoder's output was not a number at step 1 .*\.png") as e:
        train_lora(config, model, callbacks=[lambda event, trainer: trainers.append(trainer)])
    assert fix in str(e.value) and e.value.changes == changes


def test_a_loss_that_is_no_number_offers_a_lower_learning_rate(tiny_checkpoint, sample_images, tmp_path):
    from lora_train.trainer import TrainingDivergedError

    model = load_diffusers_model(str(tiny_checkpoint))
    predict = model.predict
    model.predict = lambda *args: predict(*args) * float("nan")
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=2)
    config.training.learning_rate = 1e-3
    with pytest.raises(TrainingDivergedError, match=r"the loss became nan at step 1") as e:
        train_lora(config, model)
    assert e.value.changes["training.learning_rate"] == 5e-4
