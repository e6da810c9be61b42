"""Stand-in for backend/memory_management.py with --always-cpu: nothing moves; loads are recorded."""

import torch

cpu = torch.device("cpu")
current_loaded_models = []


def get_torch_device():
    return cpu


def text_encoder_device():
    return cpu


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    """Forge loads each patcher not loaded yet (unloading its clones; model_load refreshes its LoRAs) and skips
    a patcher object already loaded."""
    for patcher in models:
        if any(patcher is loaded for loaded in current_loaded_models):
            continue
        current_loaded_models[:] = [loaded for loaded in current_loaded_models if loaded.model is not patcher.model]
        patcher.refresh_loras()
        current_loaded_models.insert(0, patcher)


def load_model_gpu(model):
    return load_models_gpu([model])
