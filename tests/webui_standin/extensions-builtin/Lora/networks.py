"""Stand-in for the built-in Lora extension's networks.py: layer names, file loading, the merge and its undo.

Importable as the top-level `networks`, as in the WebUI. Behaviour kept from A1111 1.10.1:
- `assign_network_names_to_compvis_modules(sd_model)` names every module of the text encoder (inside the
  hijack's `.wrapped` when there is one) and of `sd_model.model` by its path with "." -> "_"
  (`diffusion_model_input_blocks_1_1_proj_in`, `transformer_text_model_encoder_layers_0_self_attn_q_proj`);
  on SDXL, each wrapped embedder's modules get its index as prefix (`0_transformer_text_model_...`,
  `1_model_transformer_resblocks_0_attn`).
- `convert_diffusers_name_to_compvis(stem, is_sd2)` maps a kohya stem with diffusers UNet paths to that name:
  down_blocks_i_{resnets,attentions}_j -> input_blocks_{1+3i+j}_{0,1}, mid_block -> middle_block_{2j,1},
  up_blocks_i_..._j -> output_blocks_{3i+j}_{0,1}, resnet conv1/conv2/norm1/norm2/time_emb_proj/conv_shortcut ->
  in_layers_2/out_layers_3/in_layers_0/out_layers_0/emb_layers_1/skip_connection, samplers, conv_in/out,
  time_embedding; lora_te_text_model_... -> transformer_text_model_... (SD2: model_transformer_resblocks_...);
  lora_te2_text_model_... -> 1_model_transformer_resblocks_... (SDXL's OpenCLIP names). Other stems (SDXL's
  compvis UNet stems, lora_te1_...) come back as they are.
- `load_network` matches each stem (then its q/k/v fusion, then the "lora_unet" -> "diffusion_model" and
  "lora_te1" fallbacks); unmatched keys are only logged at debug level.
- The built-in merges the prompt's LoRAs into the weights (`network_apply_weights`) keeping a backup, and
  leaves them merged until a later generation; `network_restore_weights_from_backup` and
  `network_reset_cached_weight` undo that per layer. On a `nn.MultiheadAttention` (SD2's OpenCLIP layer
  `model_transformer_resblocks_0_attn`) the file's `..._attn_q_proj/_k_proj/_v_proj` (matched to the attention
  by the q/k/v fusion) and `..._attn_out_proj` are merged together into the thirds of `in_proj_weight` and into
  `out_proj.weight`, and only when all four are there; the backup holds both weights and `out_proj.bias`.
  Forward patching of torch layers is not reproduced.
"""

from __future__ import annotations

import logging
import os
import re

import torch

import network
import network_lora
from modules import sd_models, shared

module_types = [network_lora.ModuleTypeLora()]

re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")

RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                   "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _block_layer(kind: str, rest: str) -> str:
    """The compvis layer inside a block: (block index within the level, layer) -> "<0|1>_<layer>"."""
    return f"1_{rest}" if kind == "attentions" else f"0_{RESNET_SUFFIXES.get(rest, rest)}"


def _sd2_text_layer(rest: str) -> str:
    return rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")


_UNET_RULES = (
    (r"lora_unet_conv_in(.*)", lambda rest: f"diffusion_model_input_blocks_0_0{rest}"),
    (r"lora_unet_conv_out(.*)", lambda rest: f"diffusion_model_out_2{rest}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)",
     lambda i, rest: f"diffusion_model_time_embed_{2 * int(i) - 2}{rest}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda i, kind, j, rest: f"diffusion_model_input_blocks_{1 + 3 * int(i) + int(j)}_{_block_layer(kind, rest)}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda kind, j, rest: (f"diffusion_model_middle_block_1_{rest}" if kind == "attentions" else
                            f"diffusion_model_middle_block_{2 * int(j)}_{RESNET_SUFFIXES.get(rest, rest)}")),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda i, kind, j, rest: f"diffusion_model_output_blocks_{3 * int(i) + int(j)}_{_block_layer(kind, rest)}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
     lambda i: f"diffusion_model_input_blocks_{3 + 3 * int(i)}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda i: f"diffusion_model_output_blocks_{2 + 3 * int(i)}_{2 if int(i) > 0 else 1}_conv"),
)


def convert_diffusers_name_to_compvis(key, is_sd2):
    for pattern, convert in _UNET_RULES:
        match = re.match(pattern, key)
        if match:
            return convert(*match.groups())
    match = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if match:
        layer, rest = match.groups()
        if is_sd2:
            return f"model_transformer_resblocks_{layer}_{_sd2_text_layer(rest)}"
        return f"transformer_text_model_encoder_layers_{layer}_{rest}"
    match = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if match:
        return f"1_model_transformer_resblocks_{match.group(1)}_{_sd2_text_layer(match.group(2))}"
    return key


def assign_network_names_to_compvis_modules(sd_model):
    """Runs on every model load (the built-in's on_model_loaded callback): names and maps every layer."""
    if shared.sd_model.is_sdxl:
        roots = [(f"{i}_", embedder.wrapped) for i, embedder in enumerate(shared.sd_model.conditioner.embedders)
                 if hasattr(embedder, 'wrapped')]
    else:
        roots = [("", getattr(shared.sd_model.cond_stage_model, 'wrapped', shared.sd_model.cond_stage_model))]
    mapping = {}
    for prefix, root in (*roots, ("", shared.sd_model.model)):
        for name, module in root.named_modules():
            network_name = prefix + name.replace(".", "_")
            mapping[network_name] = module
            module.network_layer_name = network_name
    sd_model.network_layer_mapping = mapping


def _find_module(mapping, stem, is_sd2):
    key = convert_diffusers_name_to_compvis(stem, is_sd2)
    module = mapping.get(key)
    if module is None:
        fused = re_x_proj.match(key)
        if fused:
            module = mapping.get(fused.group(1))
    if module is None and "lora_unet" in stem:
        key = stem.replace("lora_unet", "diffusion_model")
        module = mapping.get(key)
    elif module is None and "lora_te1_text_model" in stem:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            key = stem.replace("lora_te1_text_model", replacement)
            module = mapping.get(key)
            if module is not None:
                break
    return key, module


def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    state_dict = sd_models.read_state_dict(network_on_disk.filename)
    sd_model = shared.sd_model
    if not hasattr(sd_model, 'network_layer_mapping'):
        assign_network_names_to_compvis_modules(sd_model)
    mapping = sd_model.network_layer_mapping
    is_sd2 = 'model_transformer_resblocks' in mapping

    matched, failed = {}, {}
    for key_network, weight in state_dict.items():
        stem, _, part = key_network.partition(".")
        key, module = _find_module(mapping, stem, is_sd2)
        if module is None:
            failed[key_network] = key
            continue
        if key not in matched:
            matched[key] = network.NetworkWeights(network_key=key_network, sd_key=key, w={}, sd_module=module)
        matched[key].w[part] = weight

    for key, weights in matched.items():
        module = next((m for m in (t.create_module(net, weights) for t in module_types) if m is not None), None)
        if module is None:
            types = ", ".join(type(t).__name__ for t in module_types)
            raise AssertionError(f"Could not find a module type (out of {types}) that would accept those keys: "
                                 f"{', '.join(weights.w)}")
        net.modules[key] = module

    if failed:
        logging.debug(f"Network {network_on_disk.filename} didn't match keys: {failed}")
    return net


def store_weights_backup(weight):
    return None if weight is None else weight.to("cpu", copy=True)


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    attention = isinstance(self, torch.nn.MultiheadAttention)
    if weights_backup is not None and attention:
        restore_weights_backup(self, 'in_proj_weight', weights_backup[0])
        restore_weights_backup(self.out_proj, 'weight', weights_backup[1])
    elif weights_backup is not None:
        restore_weights_backup(self, 'weight', weights_backup)
    restore_weights_backup(self.out_proj if attention else self, 'bias', bias_backup)


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def network_apply_weights(self):
    """Merges the loaded networks into this layer's weights (Linear/Conv2d/MultiheadAttention), backing them up."""
    layer_name = getattr(self, 'network_layer_name', None)
    attention = isinstance(self, torch.nn.MultiheadAttention)
    if layer_name is None or not isinstance(self, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)):
        return
    current = getattr(self, "network_current_names", ())
    wanted = tuple((net.name, net.te_multiplier, net.unet_multiplier, net.dyn_dim) for net in loaded_networks)
    if getattr(self, "network_weights_backup", None) is None and wanted != ():
        self.network_weights_backup = ((store_weights_backup(self.in_proj_weight),
                                        store_weights_backup(self.out_proj.weight)) if attention
                                       else store_weights_backup(self.weight))
        self.network_bias_backup = store_weights_backup(self.out_proj.bias if attention else self.bias)
    if current == wanted:
        return
    with torch.no_grad():
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(layer_name)
            if module is not None and hasattr(self, 'weight'):
                updown, _ = module.calc_updown(self.weight)
                self.weight.copy_(self.weight + updown.to(self.weight.dtype))
            elif attention:
                _apply_attention_weights(self, net, layer_name)
    self.network_current_names = wanted


def _apply_attention_weights(self, net, layer_name):
    """q/k/v into the thirds of in_proj_weight and out into out_proj.weight: all four, or none."""
    parts = [net.modules.get(f"{layer_name}_{part}") for part in ("q_proj", "k_proj", "v_proj", "out_proj")]
    if not all(parts):
        return
    thirds = self.in_proj_weight.chunk(3, 0)
    updown_qkv = torch.vstack([module.calc_updown(weight)[0] for module, weight in zip(parts[:3], thirds)])
    self.in_proj_weight += updown_qkv
    self.out_proj.weight += parts[3].calc_updown(self.out_proj.weight)[0]


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir, followlinks=True):
        for filename in sorted(files):
            if os.path.splitext(filename)[1].lower() not in (".pt", ".ckpt", ".safetensors"):
                continue
            entry = network.NetworkOnDisk(os.path.splitext(filename)[0], os.path.join(root, filename))
            available_networks[entry.name] = entry
            if entry.alias in available_network_aliases:
                forbidden_network_aliases[entry.alias.lower()] = 1
            available_network_aliases[entry.name] = entry
            available_network_aliases[entry.alias] = entry


available_networks = {}
available_network_aliases = {}
loaded_networks = []
loaded_bundle_embeddings = {}
networks_in_memory = {}
available_network_hash_lookup = {}
forbidden_network_aliases = {}
