"""Stand-in for Forge's extensions-builtin/sd_forge_lora/networks.py: the LoRA list and `load_networks`.

Faithful to what a trainer must undo: files are cached by path (`load_lora_state_dict`, an lru_cache),
`current_lora_hash` skips work when the same files are asked for again, and the patches are merged into the
shared weights by the patchers' LoraLoader, where they stay until a generation asks for other LoRAs. Prints
Forge's `[LORA] ...` lines.
"""

import functools
import os

from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from modules import sd_models, shared

available_networks = {}


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    from safetensors.torch import load_file

    return load_file(filename)


def list_available_networks():
    available_networks.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for name in sorted(os.listdir(shared.cmd_opts.lora_dir)):
        if name.endswith(".safetensors"):
            available_networks[os.path.splitext(name)[0]] = os.path.join(shared.cmd_opts.lora_dir, name)


def load_lora_for_models(unet, clip, lora, strength, filename):
    unet_patches, rest = load_lora(lora, model_lora_keys_unet(unet.model, {}))
    clip_patches, rest = load_lora(rest, model_lora_keys_clip(clip.cond_stage_model, {}))
    if rest:
        print(f"[LORA] Loading {filename} for KModel with unmatched keys {list(rest)}")
    unet, clip = unet.clone(), clip.clone()
    for part, patcher, patches in (("UNet", unet, unet_patches), ("CLIP", clip.patcher, clip_patches)):
        placed = patcher.add_patches(filename=filename, patches=patches, strength_patch=strength)
        print(f"[LORA] Loaded {filename} for KModel-{part} with {len(placed)} keys at weight {strength} "
              f"(skipped {len(patches) - len(placed)} keys) with on_the_fly = False")
    return unet, clip


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    engine = sd_models.model_data.sd_model
    if any(name not in available_networks for name in names):
        list_available_networks()
    targets = [[available_networks[name], multiplier, multiplier, False]
               for name, multiplier in zip(names, unet_multipliers or [1.0] * len(names))]
    if engine.current_lora_hash == str(targets):
        return
    engine.current_lora_hash = str(targets)
    objects = engine.forge_objects
    objects.unet, objects.clip = engine.forge_objects_original.unet, engine.forge_objects_original.clip
    for filename, strength, _te_strength, _online in targets:
        objects.unet, objects.clip = load_lora_for_models(objects.unet, objects.clip, load_lora_state_dict(filename),
                                                          strength, filename)
    engine.forge_objects_after_applying_lora = objects.shallow_copy()
