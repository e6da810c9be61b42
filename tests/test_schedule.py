"""The noise schedule a run trains on: the trainer's loss against the formulas written out by hand (epsilon and v,
with and without zero terminal SNR and Min-SNR), the rescaled schedule's properties, the prediction override in
the file's metadata, and a resume that would change what the UNet learns refused."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lora_train.checkpoint import CheckpointError
from lora_train.config import ConfigError, DataConfig, TrainConfig
from lora_train.dataset import load_dataset
from lora_train.export import build_metadata
from lora_train.losses import min_snr_weight, rescale_zero_terminal_snr, snr
from lora_train.models.common import HeldModelAdapter
from lora_train.models.conditioning import Cond
from lora_train.pipeline import build_network, train_lora
from lora_train.trainer import Trainer

CPU = torch.device("cpu")
SHORT_SCHEDULE = torch.cumprod(1 - torch.linspace(0.05, 0.4, 6), dim=0)  # 6 steps: a batch draws the last one
BATCH = 16
SEED = 3


def sd_schedule(steps: int = 1000) -> torch.Tensor:
    """SD's scaled-linear schedule (beta 0.00085 to 0.012)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


class TrivialModel(HeldModelAdapter):
    """A DiffusionModel whose UNet is one 1x1 convolution on the latents and whose VAE is one strided one."""

    family, name, clip_skip, size_conditioned, device = "sd1", "trivial", 1, False, CPU

    def __init__(self, prediction: str = "epsilon", alphas_cumprod: torch.Tensor = SHORT_SCHEDULE):
        self.prediction, self.alphas_cumprod = prediction, alphas_cumprod
        generator = torch.Generator().manual_seed(0)
        self.unet, self.vae = nn.Conv2d(4, 4, 1), nn.Conv2d(3, 4, 8, stride=8)
        with torch.no_grad():
            for parameter in [*self.unet.parameters(), *self.vae.parameters()]:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def lora_targets(self, spec):
        return {"lora_unet_conv": self.unet}

    def encode_images(self, pixels):
        return self.vae(pixels)

    def encode_prompts(self, captions, sizes):
        return Cond(torch.zeros(len(captions), 1, 4))

    def encoders(self):
        return {"vae": self.vae}

    def predict(self, noisy, timesteps, cond):
        return self.unet(noisy)

    @contextlib.contextmanager
    def training(self, gradient_checkpointing, text_encoder):
        yield


def make_config(images, out, prediction="auto", zero_terminal_snr=False, min_snr_gamma=None) -> TrainConfig:
    config = TrainConfig(data=DataConfig(train_data_dir=str(images), resolution=64, min_bucket_reso=64,
                                         max_bucket_reso=128))
    config.model.prediction, config.model.lora_rank, config.model.alpha = prediction, 2, 2.0
    config.training.zero_terminal_snr, config.training.min_snr_gamma = zero_terminal_snr, min_snr_gamma
    config.training.batch_size, config.training.max_train_steps = 4, 2
    config.output.output_dir, config.output.output_name = str(out), "schedule_lora"
    return config.validate(require_base_model=False)


def make_trainer(model, config) -> Trainer:
    return Trainer(model, build_network(config, model), load_dataset(config.data), config, CPU)


def zero_terminal_by_hand(alphas_cumprod):
    """Lin et al. 2023, Algorithm 1, one number at a time."""
    roots = [math.sqrt(a) for a in alphas_cumprod.double().tolist()]
    first, last = roots[0], roots[-1]
    return [((root - last) * first / (first - last)) ** 2 for root in roots]


def loss_by_hand(model, latents, alphas, prediction, gamma):
    """The trainer's loss for one batch, drawing what it draws (noise, then timesteps) from the same seed."""
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, len(alphas), (latents.shape[0],), generator=generator)
    losses = []
    for x0, eps, t in zip(latents, noise, timesteps.tolist()):
        a = alphas[t]
        noisy = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        output = model.unet(noisy.unsqueeze(0))[0]
        target = eps if prediction == "epsilon" else math.sqrt(a) * eps - math.sqrt(1 - a) * x0
        loss = ((output - target) ** 2).mean()
        if gamma:
            ratio = a / (1 - a)
            if prediction == "v_prediction":
                weight = min(ratio, gamma) / (ratio + 1)
            else:
                weight = 1.0 if ratio == 0 else min(ratio, gamma) / ratio
            loss = loss * weight
        losses.append(loss)
    return torch.stack(losses).mean(), timesteps


@pytest.mark.parametrize("model_prediction, configured, zero_terminal_snr, trained", [
    ("epsilon", "auto", False, "epsilon"),
    ("v_prediction", "auto", False, "v_prediction"),
    ("epsilon", "v_prediction", False, "v_prediction"),  # the override: a v-pred file without the marker
    ("v_prediction", "epsilon", False, "epsilon"),
    ("v_prediction", "auto", True, "v_prediction"),
    ("epsilon", "v_prediction", True, "v_prediction"),
])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_the_trainers_loss_is_the_formula_by_hand(sample_images, tmp_path, model_prediction, configured,
                                                  zero_terminal_snr, trained, gamma):
    model = TrivialModel(model_prediction)
    config = make_config(sample_images, tmp_path, configured, zero_terminal_snr, gamma)
    trainer = make_trainer(model, config)
    latents = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = trainer._loss(latents, Cond(torch.zeros(BATCH, 1, 4)), torch.Generator().manual_seed(SEED))
        alphas = zero_terminal_by_hand(SHORT_SCHEDULE) if zero_terminal_snr else SHORT_SCHEDULE.tolist()
        expected, timesteps = loss_by_hand(model, latents, alphas, trained, gamma)
    assert trainer.schedule.prediction == trained
    if zero_terminal_snr:
        assert len(alphas) - 1 in timesteps.tolist(), "the batch covers the step with SNR 0"
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)


def test_zero_terminal_snr_schedule_ends_in_pure_noise_and_keeps_the_first_step():
    original = sd_schedule()
    rescaled = rescale_zero_terminal_snr(original)
    assert rescaled.dtype == original.dtype and rescaled.shape == original.shape
    assert rescaled[-1].item() == 0.0 and original[-1].item() > 0.004
    torch.testing.assert_close(snr(rescaled[:1]), snr(original[:1]), rtol=1e-5, atol=0.0)
    assert bool((rescaled[1:] < rescaled[:-1]).all()), "still strictly decreasing"
    assert bool((rescaled[1:-1] < original[1:-1]).all()), "every step in between is noisier than before"
    torch.testing.assert_close(rescaled.double(), torch.tensor(zero_terminal_by_hand(original), dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)


def test_min_snr_weight_is_finite_at_snr_zero():
    alpha_bar = torch.tensor([0.0, 0.2, 0.9])
    epsilon, v = min_snr_weight(alpha_bar, 5.0, "epsilon"), min_snr_weight(alpha_bar, 5.0, "v_prediction")
    assert bool(torch.isfinite(epsilon).all()) and bool(torch.isfinite(v).all())
    ratio = [0.2 / 0.8, 0.9 / 0.1]
    torch.testing.assert_close(epsilon, torch.tensor([1.0, 1.0, 5.0 / ratio[1]]))
    torch.testing.assert_close(v, torch.tensor([0.0, ratio[0] / (ratio[0] + 1), 5.0 / (ratio[1] + 1)]))


def test_zero_terminal_snr_on_a_model_that_predicts_epsilon_is_refused(sample_images, tmp_path):
    config = make_config(sample_images, tmp_path, "auto", zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="training.zero_terminal_snr: .*use model.prediction: v_prediction"):
        make_trainer(TrivialModel("epsilon"), config)


@pytest.mark.parametrize("model_prediction, configured, zero_terminal_snr, v", [
    ("epsilon", "auto", False, False),
    ("v_prediction", "auto", False, True),
    ("epsilon", "v_prediction", True, True),
    ("v_prediction", "epsilon", False, False),
])
def test_the_metadata_records_the_schedule_trained_on(sample_images, tmp_path, model_prediction, configured,
                                                      zero_terminal_snr, v):
    model = TrivialModel(model_prediction)
    config = make_config(sample_images, tmp_path, configured, zero_terminal_snr)
    metadata = build_metadata(config, model, build_network(config, model), load_dataset(config.data), 1, 1)
    assert metadata["ss_v_parameterization"] == str(v)
    assert metadata["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert metadata["ss_zero_terminal_snr"] == str(zero_terminal_snr)


def test_a_run_with_the_override_writes_it_into_the_file(sample_images, tmp_path):
    config = make_config(sample_images, tmp_path, "v_prediction", zero_terminal_snr=True, min_snr_gamma=5.0)
    result = train_lora(config, TrivialModel("epsilon"))
    assert result.state == "done" and all(math.isfinite(loss) for loss in result.losses)
    with safe_open(str(result.lora_path), "pt") as file:
        metadata = file.metadata()
    assert (metadata["ss_v_parameterization"], metadata["ss_zero_terminal_snr"]) == ("True", "True")


@pytest.mark.parametrize("changed, message", [
    ({"zero_terminal_snr": False}, "zero_terminal_snr: True -> False"),
    ({"prediction": "auto", "zero_terminal_snr": False}, "prediction: 'v_prediction' -> 'epsilon'"),
])
def test_resume_with_another_schedule_is_refused(sample_images, tmp_path, changed, message):
    model = TrivialModel("epsilon")
    folder = make_trainer(model, make_config(sample_images, tmp_path, "v_prediction", True)).save_checkpoint()
    settings = {"prediction": "v_prediction", "zero_terminal_snr": True, **changed}
    resumed = make_trainer(model, make_config(sample_images, tmp_path, settings["prediction"],
                                              settings["zero_terminal_snr"]))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        resumed.resume(folder)
