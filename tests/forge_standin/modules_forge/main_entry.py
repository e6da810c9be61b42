"""Stand-in for modules_forge/main_entry.py: the loading parameters of the selected checkpoint."""

from modules import sd_models


def refresh_model_loading_parameters():
    data = sd_models.model_data
    info = sd_models.CheckpointInfo(data.checkpoint) if data.checkpoint else None
    data.forge_loading_parameters = {"checkpoint_info": info, "additional_modules": [], "unet_storage_dtype": None}
