"""Stand-in for modules.devices: where the WebUI runs its models (the CPU here)."""

import torch

device = torch.device("cpu")
cpu = torch.device("cpu")
dtype = torch.float32  # A1111 with --no-half
