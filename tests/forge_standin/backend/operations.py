"""Stand-in for backend/operations.py: Forge's layers compute from `get_weight_and_bias`, casting per call.

`Linear` is a plain nn.Module (not an nn.Linear), as Forge's is; Conv2d and LayerNorm subclass torch's. With
`parameters_manual_cast` the weights are cast to the input's dtype and device on each forward.
"""

import torch
import torch.nn.functional as F


def get_weight_and_bias(layer, weight_args=None, bias_args=None):
    weight, bias = layer.weight, layer.bias
    if weight_args is not None:
        weight = weight.to(**weight_args)
    if bias is not None and bias_args is not None:
        bias = bias.to(**bias_args)
    return weight, bias


def weights_manual_cast(layer, x):
    args = dict(device=x.device, dtype=x.dtype)
    return get_weight_and_bias(layer, args, args)


def _weights(layer, x):
    return weights_manual_cast(layer, x) if layer.parameters_manual_cast else get_weight_and_bias(layer)


class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, manual_cast=False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = self.bias = None
        self.parameters_manual_cast = manual_cast

    def forward(self, x):
        return F.linear(x, *_weights(self, x))


class Conv2d(torch.nn.Conv2d):
    parameters_manual_cast = False

    def forward(self, x):
        return self._conv_forward(x, *_weights(self, x))


class LayerNorm(torch.nn.LayerNorm):
    parameters_manual_cast = False

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, *_weights(self, x), self.eps)


def forge_layers(root: torch.nn.Module, manual_cast: bool) -> None:
    """Gives a torch-built module Forge's layer classes (what Forge's `using_forge_operations` builds)."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                layer = Linear(child.in_features, child.out_features, manual_cast)
                layer.weight, layer.bias = child.weight, child.bias
                setattr(module, name, layer)
            elif type(child) in (torch.nn.Conv2d, torch.nn.LayerNorm):
                child.__class__ = Conv2d if type(child) is torch.nn.Conv2d else LayerNorm
                child.parameters_manual_cast = manual_cast
