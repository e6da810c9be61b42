"""Which adapter trains the model a host holds: the first in `ADAPTERS` that recognises it.

Each entry is `adapt(module, held) -> DiffusionModel | None`: None means "not mine"; a recognised model that cannot
be trained (an inpainting UNet, an SDXL refiner) raises `ModelLoadError` with what to load instead. The order matters:
a more specific adapter comes before a more general one, as the WebUI's Lora extension scans its module types.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from torch import nn

from . import DiffusionModel, HeldModel, ModelLoadError
from .families import SUPPORTED
from .forge import ForgeModel
from .ldm import LdmModel
from .sgm import SgmModel

Adapter = Callable[[nn.Module, HeldModel], Optional[DiffusionModel]]
# Forge's engine and the WebUI's SDXL model both also have the `cond_stage_model` and `get_learned_conditioning`
# that mark ldm's, so they come first.
ADAPTERS: Tuple[Adapter, ...] = (ForgeModel.adapt, SgmModel.adapt, LdmModel.adapt)


def adapt(module: nn.Module, held: HeldModel) -> DiffusionModel:
    """The held model as a DiffusionModel, trained in place (no copy).

    Raises:
        ModelLoadError: no adapter trains it; the message names the model and what is supported.
    """
    for adapter in ADAPTERS:
        model = adapter(module, held)
        if model is not None:
            return model
    raise ModelLoadError(f"the loaded checkpoint ({_describe(module)}) is not a model this extension trains; it "
                         f"trains {SUPPORTED}. Load one of those")


def _describe(module: nn.Module) -> str:
    for flag, title in (("is_sd3", "SD3"), ("is_flux", "Flux"), ("is_sdxl_refiner", "an SDXL refiner")):
        if getattr(module, flag, False):
            return title
    return type(module).__name__
