"""The LoRA invariants on small layers, and the target selection and kohya naming on a real tiny SD1 model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lora_train.models import TargetSpec
from lora_train.models.ldm import LdmModel
from lora_train.network import LoRAModule, LoRANetwork, NetworkSpec, create_network, lora_delta_weight
from lora_train.targets import compvis_to_diffusers_path

RANK, ALPHA = 4, 2.0
SD1_UNET_TARGETS, TINY_TE_TARGETS = 192, 12  # 16 transformers x 12 layers; 2 CLIP layers x 6


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 1), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16), nn.GELU(), nn.Linear(16, 5))


def targets_of(model: nn.Module) -> dict:
    return {f"lora_test_{name}": m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def randomise_up(network: LoRANetwork) -> None:
    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.lora_up.weight.normal_(0, 0.5)


INPUT = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_zero_initialised_up_leaves_outputs_unchanged():
    model = small_model()
    before = model(INPUT)
    network = create_network(targets_of(model), NetworkSpec(rank=RANK, alpha=ALPHA, conv_rank=2))
    handle = network.attach()
    assert_close(model(INPUT), before, rtol=0, atol=0)
    handle.detach()


@pytest.mark.parametrize("base", [nn.Linear(6, 5), nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Conv2d(3, 5, 1)])
def test_adapter_forward_equals_base_with_merged_delta(base):
    torch.manual_seed(3)
    adapter = LoRAModule(base, RANK, ALPHA, 0.0, torch.Generator().manual_seed(0))
    nn.init.normal_(adapter.lora_up.weight)
    x = torch.randn(2, 6) if isinstance(base, nn.Linear) else torch.randn(2, 3, 9, 9)
    merged = type(base)(*_layer_args(base))
    merged.load_state_dict({"weight": base.weight + adapter.delta_weight(), "bias": base.bias})
    assert_close(base(x) + adapter(x), merged(x), rtol=1e-5, atol=1e-5)


def _layer_args(base):
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    return base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding


def test_delta_weight_formula_is_scaled_up_times_down():
    down, up = torch.randn(RANK, 6), torch.randn(5, RANK)
    assert_close(lora_delta_weight(down, up, 0.5), (up @ down) * 0.5)


def test_detach_restores_state_dict_and_outputs_bit_identically():
    model = small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(INPUT)
    network = create_network(targets_of(model), NetworkSpec(rank=RANK, alpha=ALPHA, conv_rank=2))
    randomise_up(network)
    handle = network.attach()
    assert not torch.equal(model(INPUT), before), "a trained adapter must change the output"
    handle.detach()
    assert_close(model(INPUT), before, rtol=0, atol=0)
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(not m._forward_hooks for m in model.modules())


def test_multiplier_scales_the_update():
    model = small_model()
    base = model(INPUT)
    network = create_network(targets_of(model), NetworkSpec(rank=RANK, alpha=ALPHA))
    randomise_up(network)
    handle = network.attach()
    network.multiplier = 0.0
    assert_close(model(INPUT), base)
    handle.detach()


def test_state_dict_uses_kohya_tensor_names_and_sizes():
    model = small_model()
    network = create_network(targets_of(model), NetworkSpec(rank=RANK, alpha=ALPHA, conv_rank=2, conv_alpha=1))
    tensors = network.state_dict()
    assert set(tensors) == {f"{stem}.{name}" for stem in targets_of(model)
                            for name in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert tensors["lora_test_3.lora_down.weight"].shape == (RANK, 128)
    assert tensors["lora_test_0.lora_down.weight"].shape == (2, 3, 3, 3)  # the 3x3 conv takes conv_rank
    assert tensors["lora_test_0.alpha"].dim() == 0 and float(tensors["lora_test_3.alpha"]) == ALPHA


def test_wide_convs_are_skipped_without_conv_rank():
    network = create_network(targets_of(small_model()), NetworkSpec(rank=RANK))
    assert "lora_test_0" not in network.adapters and "lora_test_1" in network.adapters


def test_creating_a_network_leaves_the_global_rng_alone():
    targets = targets_of(small_model())
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = create_network(targets, NetworkSpec(seed=7))
    assert torch.equal(torch.rand(3), expected)
    second = create_network(targets, NetworkSpec(seed=7))
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), "same seed, same adapters"


@pytest.mark.parametrize("compvis, diffusers", [
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("input_blocks.8.1.proj_out", "down_blocks.2.attentions.1.proj_out"),
    ("input_blocks.4.0.in_layers.2", "down_blocks.1.resnets.0.conv1"),
    ("input_blocks.6.0.op", "down_blocks.1.downsamplers.0.conv"),
    ("middle_block.1.transformer_blocks.0.ff.net.2", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"),
    ("middle_block.2.skip_connection", "mid_block.resnets.1.conv_shortcut"),
    ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.11.1.transformer_blocks.0.attn2.to_out.0",
     "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"),
    ("output_blocks.3.0.emb_layers.1", "up_blocks.1.resnets.0.time_emb_proj"),
])
def test_compvis_paths_map_to_diffusers_paths(compvis, diffusers):
    assert compvis_to_diffusers_path(compvis) == diffusers


def test_unknown_unet_path_is_refused():
    with pytest.raises(ValueError, match="not SD1/SD2"):
        compvis_to_diffusers_path("label_emb.0.0")


def test_ldm_targets_match_the_stems_of_the_same_model_converted_by_diffusers(tiny_ldm, tiny_checkpoint):
    from lora_train.models.diffusers import load_diffusers_model

    ours = LdmModel(tiny_ldm).lora_targets(TargetSpec(text_encoder=True, conv=True))
    converted = load_diffusers_model(str(tiny_checkpoint))
    expected = {f"lora_unet_{n}".replace(".", "_") for n, m in converted.unet.named_modules()
                if _in_block(n, m, ("attentions", "resnets", "downsamplers", "upsamplers"))}
    expected |= {f"lora_te_{n}".replace(".", "_") for n, m in converted.text_encoder.named_modules()
                 if isinstance(m, nn.Linear) and (".self_attn." in n or ".mlp." in n)}
    assert set(ours) == expected
    default = LdmModel(tiny_ldm).lora_targets(TargetSpec())
    assert sum(s.startswith("lora_unet") for s in default) == SD1_UNET_TARGETS
    assert sum(s.startswith("lora_te") for s in default) == TINY_TE_TARGETS


def _in_block(name: str, module: nn.Module, kinds) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) and any(f".{k}." in name for k in kinds)
