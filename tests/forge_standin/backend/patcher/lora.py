"""Stand-in for backend/patcher/lora.py: kohya keys mapped to weights, and merging into the shared weights.

As Forge's LoraLoader, `refresh` merges under inference mode into new Parameters and keeps the originals as a
backup until a refresh with other patches; `loaded_hash` short-circuits a refresh with the same patches. The
stand-in maps UNet keys with the extension's own compvis->diffusers rename (the real Forge test checks Forge's).
"""

import torch

from lora_train.targets import compvis_to_diffusers_path

TEXT_LAYERS = "clip_l.transformer.text_model.encoder.layers."


def model_lora_keys_unet(model, key_map=None):
    """kohya stem -> parameter key of the KModel, for every Linear/Conv2d weight of the UNet."""
    key_map = {} if key_map is None else key_map
    for key, _ in model.named_parameters():
        path = key[len("diffusion_model."):-len(".weight")]
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            try:
                key_map["lora_unet_" + compvis_to_diffusers_path(path).replace(".", "_")] = key
            except ValueError:  # not a layer kohya names (time embedding, norms, ...)
                continue
    return key_map


def model_lora_keys_clip(model, key_map=None):
    key_map = {} if key_map is None else key_map
    for key, _ in model.named_parameters():
        if key.startswith(TEXT_LAYERS) and key.endswith(("_proj.weight", ".fc1.weight", ".fc2.weight")):
            key_map["lora_te_" + key[len("clip_l.transformer."):-len(".weight")].replace(".", "_")] = key
    return key_map


def load_lora(lora, to_load):
    """(patches keyed by weight key, the file's tensors no key placed)."""
    patches, used = {}, set()
    for stem, key in to_load.items():
        names = [f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"]
        if names[0] in lora:
            patches[key] = tuple(lora.get(name) for name in names)
            used.update(name for name in names if name in lora)
    return patches, {name: value for name, value in lora.items() if name not in used}


def _module_and_name(model, key):
    path, name = key.rsplit(".", 1)
    return model.get_submodule(path), name


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return
        for key, weight in self.backup.items():
            module, name = _module_and_name(self.model, key)
            module._parameters[name] = weight
        self.backup = {}
        for (_filename, strength, _model_strength, _online), patches in lora_patches.items():
            for key, (up, down, alpha) in patches.items():
                module, name = _module_and_name(self.model, key)
                weight = module._parameters[name]
                self.backup.setdefault(key, weight)
                scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
                delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape) * scale * strength
                module._parameters[name] = torch.nn.Parameter((weight.float() + delta).to(weight.dtype),
                                                              requires_grad=False)
        self.loaded_hash = hashes
