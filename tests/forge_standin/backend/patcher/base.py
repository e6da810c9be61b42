"""Stand-in for backend/patcher/base.py: a ModelPatcher holds LoRA patches; refresh_loras merges them."""

from backend.patcher.lora import LoraLoader


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.lora_patches = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        patcher = ModelPatcher(self.model)
        patcher.lora_patches = self.lora_patches.copy()
        return patcher

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        """Keeps the patches for keys the model has; returns those keys."""
        model_keys = {name for name, _ in self.model.named_parameters()}
        placed = {key: value for key, value in patches.items() if key in model_keys}
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = placed
        return set(placed)

    def refresh_loras(self):
        self.lora_loader.refresh(self.lora_patches)
