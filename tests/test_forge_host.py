"""ForgeHost and the Forge model adapter against the stand-in Forge (tests/forge_standin): the lazily loaded engine,
layers that are not nn.Linear, inference-tensor weights, a LoRA left merged by a generation, the file caches, the
model given back bit for bit, and Forge picked as the host."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from forge_standin import forge_engine, installed
from host_state import assert_same_model, snapshot
from lora_train.cli_demo import make_sample_dataset
from lora_train.config import config_from_dict
from lora_train.layers import is_linear
from lora_train.models import TargetSpec
from lora_train.models.forge import ForgeModel
from lora_train.pipeline import train_lora
from lora_train.webui.forge import ForgeHost
from webui_standin import train_values

PROMPT = "a red circle"


@pytest.fixture
def forge(tiny_checkpoint, tmp_path):
    """The stand-in Forge with the tiny checkpoint selected, not loaded yet; yields modules.shared."""
    with installed(lambda: forge_engine(tiny_checkpoint), tmp_path / "forge") as shared:
        yield shared


def engine_modules(engine) -> torch.nn.ModuleDict:
    objects = engine.forge_objects_original
    return torch.nn.ModuleDict({"unet": objects.unet.model, "clip": objects.clip.cond_stage_model,
                                "vae": objects.vae.first_stage_model})


def loaded(host: ForgeHost):
    from modules import call_queue

    with call_queue.queue_lock:
        engine = host.load_engine()
    host.generate(PROMPT, seed=1, steps=2, width=64, height=64)  # Forge's one-time casts happen here
    return engine


def train(host: ForgeHost, tmp_path, name: str, overwrite: bool = False, **training):
    values = train_values(make_sample_dataset(tmp_path / f"images-{name}"), name, steps=2,
                          output_dir=str(host.lora_dir()), overwrite=overwrite)
    values["model"]["train_text_encoder"] = True
    values["training"].update(training)
    config = config_from_dict(values).validate(require_base_model=False)
    with host.exclusive("lora_train"):
        result = train_lora(config, host.training_model())
        return result, host.after_save(result.lora_path)


def test_forge_is_the_host_picked_and_its_engine_the_adapter_picked(forge):
    from lora_train.models.adapters import adapt
    from lora_train.webui.callbacks import pick_host

    host = pick_host()
    assert isinstance(host, ForgeHost)
    assert not host.engine_loaded()
    host.check_trainable()  # nothing loaded yet: the job loads it
    engine = loaded(host)
    assert isinstance(host.training_model(), ForgeModel)
    assert isinstance(adapt(engine, host_held(host)), ForgeModel)


def host_held(host):
    from lora_train.models import HeldModel

    return HeldModel(name=host.checkpoint_name())


def test_targets_are_forge_layers_not_nn_linear(forge):
    engine = loaded(ForgeHost())
    model = ForgeModel.adapt(engine, host_held(ForgeHost()))
    assert not [m for m in model.unet.modules() if isinstance(m, torch.nn.Linear)]
    targets = model.lora_targets(TargetSpec(text_encoder=True))
    unet = [stem for stem in targets if stem.startswith("lora_unet_")]
    text = [stem for stem in targets if stem.startswith("lora_te_")]
    assert len(text) == 2 * 6 and all(is_linear(targets[stem]) for stem in text)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet
    assert all(p.is_inference() for p in model.unet.parameters())


def test_training_gives_the_engine_back_bit_identical_and_copies_no_weight(forge, tmp_path):
    host = ForgeHost()
    engine = loaded(host)
    modules = engine_modules(engine)
    before = snapshot(modules)
    image = host.generate(PROMPT, seed=3, steps=2, width=64, height=64)
    pointers = {n: p.data_ptr() for n, p in modules.named_parameters()}
    result, verification = train(host, tmp_path, "plain", gradient_checkpointing=True)
    assert result.state == "done" and len(result.losses) == 2 and all(loss == loss for loss in result.losses)
    assert verification.ok and verification.matched == verification.stems, verification
    assert_same_model(modules, before)
    assert {n: p.data_ptr() for n, p in modules.named_parameters()} == pointers
    assert all(p.is_inference() and p.requires_grad for p in modules.parameters())
    assert list(host.generate(PROMPT, seed=3, steps=2, width=64, height=64).getdata()) == list(image.getdata())


def test_a_merged_lora_is_undone_before_training_and_the_new_file_is_used(forge, tmp_path):
    host = ForgeHost()
    engine = loaded(host)
    modules = engine_modules(engine)
    before = snapshot(modules)
    plain = host.generate(PROMPT, seed=3, steps=2, width=64, height=64)
    result, _ = train(host, tmp_path, "first", learning_rate=5e-2)
    first = host.generate(f"{PROMPT} <lora:first:1>", seed=3, steps=2, width=64, height=64)
    assert list(first.getdata()) != list(plain.getdata())
    assert engine.current_lora_hash != str([])  # Forge left the LoRA merged into the shared weights
    result, verification = train(host, tmp_path, "first", learning_rate=5e-2, seed=1, overwrite=True)
    assert verification.ok
    assert_same_model(modules, before)  # merged LoRA undone, and nothing of the job left behind
    second = host.generate(f"{PROMPT} <lora:first:1>", seed=3, steps=2, width=64, height=64)
    assert list(second.getdata()) != list(first.getdata()), "the rewritten file is used, not Forge's cached one"
    assert list(host.generate(PROMPT, seed=3, steps=2, width=64, height=64).getdata()) == list(plain.getdata())


def test_verification_names_the_stems_forge_cannot_place(forge, tmp_path):
    host = ForgeHost()
    loaded(host)
    result, _ = train(host, tmp_path, "bogus")
    tensors = load_file(str(result.lora_path))
    bogus = "lora_unet_down_blocks_9_attentions_0_proj_in"
    tensors.update({f"{bogus}.lora_down.weight": torch.zeros(4, 8), f"{bogus}.lora_up.weight": torch.zeros(8, 4),
                    f"{bogus}.alpha": torch.tensor(4.0)})
    save_file(tensors, str(result.lora_path))
    verification = host.verify_lora(result.lora_path)
    assert verification.unmatched == [bogus] and not verification.ok


def test_low_bit_storage_is_refused_naming_the_forge_setting(forge):
    from lora_train.webui.host import HostError

    host = ForgeHost()
    engine = loaded(host)
    engine.forge_objects.unet.model.storage_dtype = torch.float8_e4m3fn
    with pytest.raises(HostError, match="Diffusion in Low Bits"):
        host.check_trainable()


def test_a_job_sees_normal_frozen_tensors_over_the_same_memory(forge):
    """No weight is copied: each alias is a new, frozen, non-inference tensor at the original's address."""
    from lora_train.models.forge import normal_weights

    engine = loaded(ForgeHost())
    modules = engine_modules(engine)
    originals = dict(modules.named_parameters())
    with normal_weights(list(modules.children())):
        aliases = dict(modules.named_parameters())
        assert aliases.keys() == originals.keys()
        assert not [n for n, p in aliases.items() if p is originals[n] or p.is_inference() or p.requires_grad]
        assert not [n for n, p in aliases.items() if p.data_ptr() != originals[n].data_ptr()]
    assert all(p is originals[n] for n, p in modules.named_parameters())
