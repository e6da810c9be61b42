"""Stand-in for Forge's modules/sd_models.py: a placeholder model until the first use, then the engine.

`forge_model_reload()` (under inference mode, as Forge's) builds the engine with the factory the stand-in was
installed with; `shared.sd_model` is the FakeInitialModel (no `forge_objects`) until then.
"""

import os

import torch

from modules import shared


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.name_for_extra = os.path.splitext(self.name)[0]
        self.title = self.name


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""
        self.factory = None  # set by forge_standin.installed(): () -> engine
        self.checkpoint = None


model_data = SdModelData()


@torch.inference_mode()
def forge_model_reload():
    current = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current:
        return model_data.sd_model, False
    if model_data.forge_loading_parameters.get("checkpoint_info") is None:
        raise ValueError("You do not have any model! Please download at least one model in [models/Stable-diffusion].")
    engine = model_data.factory()
    engine.sd_checkpoint_info = model_data.forge_loading_parameters["checkpoint_info"]
    model_data.sd_model = shared.sd_model = engine
    model_data.forge_hash = current
    return engine, True
