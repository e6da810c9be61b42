"""Stand-in for modules/sd_models.py: CheckpointInfo's names and read_state_dict."""

import os


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.name_for_extra = os.path.splitext(self.name)[0]
        self.model_name = self.name_for_extra
        self.hash = self.sha256 = self.shorthash = None
        self.title = self.name
        self.short_title = self.name_for_extra


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    if os.path.splitext(checkpoint_file)[1].lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(checkpoint_file, device=map_location or "cpu")
    import torch

    state = torch.load(checkpoint_file, map_location=map_location or "cpu")
    return state.get("state_dict", state)
