"""Stand-in for the built-in Lora extension's network.py: a file in the Lora folder, a loaded network, a layer.

Importable as the top-level `network`, as in the WebUI (the extension's folder is on sys.path). File hashes
are not computed.
"""

from __future__ import annotations

import enum
import logging
import os
from collections import namedtuple

NetworkWeights = namedtuple('NetworkWeights', ['network_key', 'sd_key', 'w', 'sd_module'])


class SdVersion(enum.Enum):
    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        self.metadata = {}
        if self.is_safetensors:
            try:
                from safetensors import safe_open

                with safe_open(filename, "pt") as file:
                    self.metadata = dict(file.metadata() or {})
            except Exception:  # A1111 reports an unreadable file and lists it anyway
                logging.exception("reading lora %s", filename)
        self.alias = self.metadata.get('ss_output_name', self.name)
        self.hash = None
        self.shorthash = None
        self.sd_version = self.detect_version()

    def detect_version(self):
        if str(self.metadata.get('ss_base_model_version', "")).startswith("sdxl_"):
            return SdVersion.SDXL
        if str(self.metadata.get('ss_v2', "")) == "True":
            return SdVersion.SD2
        return SdVersion.SD1 if self.metadata else SdVersion.Unknown

    def get_alias(self):
        return self.alias


class Network:  # LoraModule
    def __init__(self, name, network_on_disk: NetworkOnDisk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.bundle_embeddings = {}
        self.mtime = None
        self.mentioned_name = None


class ModuleType:
    def create_module(self, net: Network, weights: NetworkWeights) -> "NetworkModule | None":
        return None


class NetworkModule:
    """One model layer's share of a network: scales and shapes the weight update."""

    def __init__(self, net: Network, weights: NetworkWeights):
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        if hasattr(self.sd_module, 'weight'):
            self.shape = self.sd_module.weight.shape
        else:  # nn.MultiheadAttention: q, k, v and out all have out_proj's shape
            self.shape = self.sd_module.out_proj.weight.shape
        self.dim = None
        self.alpha = weights.w["alpha"].item() if "alpha" in weights.w else None
        self.scale = weights.w["scale"].item() if "scale" in weights.w else None

    def multiplier(self):
        return self.network.te_multiplier if 'transformer' in self.sd_key[:20] else self.network.unet_multiplier

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def finalize_updown(self, updown, orig_weight, output_shape):
        updown = updown.reshape(output_shape).to(orig_weight.dtype)
        return updown * self.calc_scale() * self.multiplier(), None

    def calc_updown(self, target):
        raise NotImplementedError()
