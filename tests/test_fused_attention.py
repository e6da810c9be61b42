"""LoRA on fused `nn.MultiheadAttention` (OpenCLIP text towers): the maths against separate q/k/v/out layers,
gradients, detach, kohya stems and target counts, and SD2 held as the WebUI holds it, trained and then placed and
merged by the stand-in WebUI's built-in Lora loader."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close

from host_state import assert_same_model, snapshot
from lora_train.config import config_from_dict
from lora_train.fused_attention import FusedAttentionError, FusedProjection
from lora_train.models import TargetSpec
from lora_train.models.ldm import LdmModel
from lora_train.network import LoRANetwork, NetworkSpec, create_network
from lora_train.pipeline import train_lora
from lora_train.targets import OPEN_CLIP_LAYER_TARGETS, TEXT_ENCODER_2_PREFIX, find_open_clip_targets
from lora_train.tiny_sdxl import build_tiny_sdxl
from lora_train.webui.a1111 import A1111Host
from tiny_sd2 import TEXT_LAYERS_USED
from webui_standin import installed, load_tiny_ldm, train_values

WIDTH, HEADS, TOKENS, BATCH = 16, 2, 5, 3
SPEC = NetworkSpec(rank=4, alpha=2.0)
PARTS = ("q", "k", "v", "out")
STEM = "lora_te_text_model_encoder_layers_0_self_attn"
CAUSAL = torch.full((TOKENS, TOKENS), float("-inf")).triu(1)  # OpenCLIP's text mask
PROMPTS = ["demo style, a red circle", "a blue square"]
FILE_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def attention() -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(WIDTH, HEADS)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(TOKENS, BATCH, WIDTH, generator=torch.Generator().manual_seed(seed))


def fused_network(layer: nn.MultiheadAttention) -> LoRANetwork:
    return create_network({f"{STEM}_{p}_proj": FusedProjection(layer, p) for p in PARTS}, SPEC)


def randomise_up(network: LoRANetwork) -> None:
    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.lora_up.weight.normal_(0, 0.5)


class SeparateProjections(nn.Module):
    """The same attention with q, k, v and out as four nn.Linear layers: what kohya files name."""

    def __init__(self, fused: nn.MultiheadAttention):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.out_proj = nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            for layer, weight, bias in zip((self.q_proj, self.k_proj, self.v_proj),
                                           fused.in_proj_weight.chunk(3), fused.in_proj_bias.chunk(3)):
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
            self.out_proj.load_state_dict(fused.out_proj.state_dict())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length, batch, width = x.shape
        q, k, v = (p(x).reshape(length, batch, HEADS, width // HEADS).permute(1, 2, 0, 3)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(width // HEADS) + mask).softmax(dim=-1)
        return self.out_proj((weights @ v).permute(2, 0, 1, 3).reshape(length, batch, width))


def test_zero_initialised_up_leaves_the_attention_unchanged():
    layer = attention()
    before = layer(tokens(), tokens(), tokens(), attn_mask=CAUSAL, need_weights=False)[0]
    handle = fused_network(layer).attach()
    after = layer(tokens(), tokens(), tokens(), attn_mask=CAUSAL, need_weights=False)[0]
    handle.detach()
    assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_fused_adapters_compute_what_separate_projections_with_the_same_adapters_compute(multiplier):
    layer = attention()
    reference = SeparateProjections(layer)
    assert_close(reference(tokens(), CAUSAL), layer(tokens(), tokens(), tokens(), attn_mask=CAUSAL)[0])
    network = fused_network(layer)
    randomise_up(network)
    separate = create_network({f"{STEM}_{p}_proj": getattr(reference, f"{p}_proj") for p in PARTS}, SPEC)
    separate.load_state_dict(network.state_dict())
    network.multiplier = separate.multiplier = multiplier
    with torch.no_grad():
        base = layer(tokens(), tokens(), tokens(), attn_mask=CAUSAL, need_weights=False)[0]
        handles = network.attach(), separate.attach()
        fused = layer(tokens(), tokens(), tokens(), attn_mask=CAUSAL, need_weights=False)[0]
        expected = reference(tokens(), CAUSAL)
    for handle in handles:
        handle.detach()
    assert (fused - base).abs().max() > 0.1
    assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_fused_adapters_equal_the_merged_weights_the_webui_applies():
    layer = attention()
    network = fused_network(layer)
    randomise_up(network)
    network.multiplier = 0.8
    x = tokens().transpose(0, 1)
    batch_first = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
    batch_first.load_state_dict(layer.state_dict())
    with torch.no_grad():
        batch_first.in_proj_weight += torch.cat([network.adapters[f"{STEM}_{p}_proj"].delta_weight()
                                                 for p in "qkv"]) * 0.8
        batch_first.out_proj.weight += network.adapters[f"{STEM}_out_proj"].delta_weight() * 0.8
        merged = batch_first(x, x, x, key_padding_mask=torch.tensor([[False] * 4 + [True]] * BATCH))
        layer.batch_first = True
        handle = network.attach()
        ours = layer(x, x, x, key_padding_mask=torch.tensor([[False] * 4 + [True]] * BATCH))
    handle.detach()
    assert_close(ours[0], merged[0], rtol=1e-5, atol=1e-5)
    assert_close(ours[1], merged[1], rtol=1e-5, atol=1e-6)  # need_weights: the head-averaged probabilities


def test_gradients_reach_down_and_up_of_all_four_projections():
    layer = attention()
    network = fused_network(layer)
    randomise_up(network)
    handle = network.attach()
    layer(tokens(), tokens(), tokens(), attn_mask=CAUSAL, need_weights=False)[0].square().sum().backward()
    handle.detach()
    missing = [f"{stem}.{name}" for stem, adapter in network.adapters.items()
               for name, p in adapter.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert layer.in_proj_weight.grad is not None  # the base was not frozen here, and it still learns


def test_detach_leaves_the_attention_bit_identical_and_never_calls_the_class_forward(monkeypatch):
    layer = attention()
    before, class_forward = snapshot(layer), nn.MultiheadAttention.forward
    calls = []

    def patched(self, *args, **kwargs):  # as the WebUI's built-in Lora patches it, process-wide
        calls.append(self)
        return class_forward(self, *args, **kwargs)

    monkeypatch.setattr(nn.MultiheadAttention, "forward", patched)
    network = fused_network(layer)
    randomise_up(network)
    handle = network.attach()
    layer(tokens(), tokens(), tokens(), attn_mask=CAUSAL)[0].sum().backward()
    assert calls == [] and "forward" in layer.__dict__
    handle.detach()
    layer.zero_grad(set_to_none=True)
    assert_same_model(layer, before)
    assert nn.MultiheadAttention.forward is patched
    layer(tokens(), tokens(), tokens())
    assert calls == [layer]


def test_a_second_network_on_the_same_attention_is_refused_and_leaves_no_hook():
    layer = attention()
    first = fused_network(layer).attach()
    with pytest.raises(FusedAttentionError, match="detach that one first"):
        fused_network(layer).attach()
    first.detach()
    assert "forward" not in layer.__dict__


def test_sd2_text_encoder_gets_six_kohya_stems_per_layer_it_conditions_on(tiny_sd2_checkpoint):
    model = LdmModel(load_tiny_ldm(tiny_sd2_checkpoint[0]))
    targets = {s: t for s, t in model.lora_targets(TargetSpec()).items() if s.startswith("lora_te_")}
    stems = {f"lora_te_text_model_encoder_layers_{i}_{suffix}"
             for i in range(TEXT_LAYERS_USED) for suffix, _, _ in OPEN_CLIP_LAYER_TARGETS}
    assert set(targets) == stems and len(stems) == 6 * TEXT_LAYERS_USED
    resblock = model.sd_model.cond_stage_model.model.transformer.resblocks[1]
    assert targets["lora_te_text_model_encoder_layers_1_self_attn_v_proj"].attention is resblock.attn
    assert targets["lora_te_text_model_encoder_layers_1_mlp_fc2"] is resblock.mlp.c_proj
    state = create_network(targets, SPEC).state_dict()
    assert set(state) == {f"{stem}.{part}" for stem in stems for part in FILE_PARTS}
    assert state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].dim() == 0


def test_sdxl_second_text_encoder_gets_eighteen_targets_on_three_layers():
    open_clip_model = build_tiny_sdxl().conditioner.embedders[1].model
    targets = find_open_clip_targets(open_clip_model, TEXT_ENCODER_2_PREFIX)
    assert len(targets) == 18
    assert sum(isinstance(t, FusedProjection) for t in targets.values()) == 12
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj" in targets


@pytest.fixture(scope="module")
def sd2_lora(tiny_sd2_checkpoint, tmp_path_factory):
    """(the tiny SD2 ldm model, a LoRA trained for two steps on it with the text encoder)."""
    from lora_train.cli_demo import make_sample_dataset

    folder = tmp_path_factory.mktemp("sd2-lora")
    sd_model = load_tiny_ldm(tiny_sd2_checkpoint[0])
    values = train_values(make_sample_dataset(folder / "images"), "sd2", steps=2, output_dir=str(folder))
    values["training"]["learning_rate"] = 1e-2
    before = snapshot(sd_model)
    result = train_lora(config_from_dict(values).validate(require_base_model=False), LdmModel(sd_model))
    assert_same_model(sd_model, before)
    return sd_model, result.lora_path


def test_sd2_trains_its_text_encoder_and_the_builtin_places_every_stem(sd2_lora, tmp_path):
    sd_model, path = sd2_lora
    tensors = load_file(str(path))
    text = {key.split(".")[0] for key in tensors if key.startswith("lora_te_")}
    assert len(text) == 6 * TEXT_LAYERS_USED
    still_zero = [stem for stem in text if not tensors[f"{stem}.lora_up.weight"].abs().sum() > 0]
    assert still_zero == []
    with safe_open(str(path), "pt") as file:
        assert file.metadata()["ss_network_train_unet_only"] == "False"
    with installed(sd_model, tmp_path / "webui"):
        verification = A1111Host().verify_lora(path)
    assert verification.unmatched == [] and verification.matched == verification.stems > len(text)


def test_verify_lora_counts_a_fused_layer_without_its_out_projection_as_unplaced(sd2_lora, tmp_path):
    sd_model, path = sd2_lora
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith(f"{STEM}_out_proj.")}
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial))
    with installed(sd_model, tmp_path / "webui"):
        verification = A1111Host().verify_lora(partial)
    assert verification.unmatched == [f"{STEM}_{p}_proj" for p in "kqv"]  # sorted; merged only with all four


def test_the_builtin_merge_of_an_sd2_file_gives_the_text_encoding_our_adapters_give(tiny_sd2_checkpoint, tmp_path):
    sd_model = load_tiny_ldm(tiny_sd2_checkpoint[0])
    ours = create_network(LdmModel(sd_model).lora_targets(TargetSpec()), SPEC)
    randomise_up(ours)
    path = tmp_path / "sd2.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    with torch.no_grad():
        base = sd_model.get_learned_conditioning(PROMPTS)
        handle = ours.attach()
        adapted = sd_model.get_learned_conditioning(PROMPTS)
        handle.detach()
    with installed(sd_model, tmp_path / "webui"):
        import network
        import networks

        networks.loaded_networks.append(networks.load_network("sd2", network.NetworkOnDisk("sd2", str(path))))
        with torch.no_grad(), generation_forwards(sd_model.cond_stage_model, networks):
            merged = sd_model.get_learned_conditioning(PROMPTS)
        A1111Host().restore_base_weights()
        with torch.no_grad():
            restored = sd_model.get_learned_conditioning(PROMPTS)
    assert (adapted - base).abs().max() > 0.1
    assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert torch.equal(restored, base)


class generation_forwards:
    """The built-in's patched forwards for a with-block: each layer merges the loaded networks when it runs.

    A fused attention never calls its `out_proj`, so, as in the WebUI, out is merged only through the attention.
    """

    def __init__(self, root: nn.Module, networks):
        self.root, self.networks, self.hooks = root, networks, []

    def __enter__(self):
        merge = self.networks.network_apply_weights
        self.hooks = [m.register_forward_pre_hook(lambda module, _: merge(module)) for m in self.root.modules()]

    def __exit__(self, *_):
        for hook in self.hooks:
            hook.remove()
