"""Stand-in for the built-in Lora extension's network_lora.py: plain LoRA layers (lora_up / lora_down).

Like the built-in, it builds torch layers for up and down (their default init draws from the global RNG)
and copies the file's weights into them.
"""

import torch

import network


class ModuleTypeLora(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if all(key in weights.w for key in ("lora_up.weight", "lora_down.weight")):
            return NetworkModuleLora(net, weights)
        return None


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        self.up_model = self._layer(weights.w["lora_up.weight"])
        self.down_model = self._layer(weights.w["lora_down.weight"])
        self.dim = weights.w["lora_down.weight"].shape[0]

    @staticmethod
    def _layer(weight: torch.Tensor) -> torch.nn.Module:
        if weight.dim() == 2:
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif weight.dim() == 4:
            layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False)
        else:
            raise AssertionError(f"Lora layer weight of shape {tuple(weight.shape)} is not supported")
        with torch.no_grad():
            layer.weight.copy_(weight)
        return layer

    def calc_updown(self, orig_weight):
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)
        updown = up.flatten(1).float() @ down.flatten(1).float()
        return self.finalize_updown(updown, orig_weight, orig_weight.shape)
