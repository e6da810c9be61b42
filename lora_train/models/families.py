"""The model families we train and what a LoRA file says about each, so loaders show the right base model.

Values follow kohya sd-scripts (`ss_base_model_version`, `ss_v2`, `ss_v_parameterization`) and ModelSpec 1.0
(`modelspec.architecture`, `modelspec.implementation`). The WebUI hides a LoRA card whose base model it cannot
tell, so every family must fill all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

DIFFUSERS = "diffusers"
GENERATIVE_MODELS = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sd2" | "sdxl": DiffusionModel.family
    title: str  # for messages
    base_model_version: str  # ss_base_model_version of an epsilon model
    v_base_model_version: str  # ... of a v-prediction model
    architecture: str  # modelspec.architecture (without "/lora") of an epsilon model
    v_architecture: str
    implementation: str  # modelspec.implementation
    v2: bool  # kohya's ss_v2: SD2's OpenCLIP text encoder

    def metadata(self, prediction: str) -> Dict[str, str]:
        v = prediction == "v_prediction"
        return {"ss_base_model_version": self.v_base_model_version if v else self.base_model_version,
                "ss_v2": str(self.v2), "ss_v_parameterization": str(v),
                "modelspec.architecture": f"{self.v_architecture if v else self.architecture}/lora",
                "modelspec.implementation": self.implementation,
                "modelspec.prediction_type": "v" if v else "epsilon"}


FAMILIES: Dict[str, Family] = {family.name: family for family in (
    Family("sd1", "SD 1.x", "sd_v1", "sd_v1", "stable-diffusion-v1", "stable-diffusion-v1", DIFFUSERS, False),
    Family("sd2", "SD 2.x", "sd_v2", "sd_v2_v", "stable-diffusion-v2-512", "stable-diffusion-v2-768-v", DIFFUSERS,
           True),
    Family("sdxl", "SDXL", "sdxl_base_v1-0", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base",
           "stable-diffusion-xl-v1-base", GENERATIVE_MODELS, False),
)}
SUPPORTED = "SD 1.x, SD 2.x and SDXL (also Pony, Illustrious, NoobAI and other SDXL-based checkpoints)"
