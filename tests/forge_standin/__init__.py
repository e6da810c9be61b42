"""A stand-in Stable Diffusion WebUI Forge (lllyasviel main @ dfdcbab6) for the tests that run without one.

`installed(factory, data_dir, args)` starts it for one with-block, as Forge starts: the stand-in `modules`
(Forge's `sd_models` and `processing`; the rest is A1111's shell, from tests/webui_standin), `modules_forge`,
`backend` and the built-in `sd_forge_lora` extension's `networks` go on sys.path; the command line is read after
every `preload(parser)`, this extension's included; the checkpoint is selected but not loaded:
`shared.sd_model` is Forge's FakeInitialModel until `sd_models.forge_model_reload()` calls `factory()`.
Afterwards sys.path, sys.modules and $COMMANDLINE_ARGS are as they were.

What it keeps of Forge, because a trainer must cope with it: Linear layers that are not nn.Linear (weights cast per
call), every weight an inference tensor with requires_grad=True, every module in training mode, a transformer
block that adds in place after its LayerNorms and raises on its own checkpoint switch, a float16 text encoder
whose embeddings the text path casts to float32 on first use, LoRAs merged into the shared weights by a
generation and kept there until a generation without them, and the caches that keep an old file's weights
(`load_lora_state_dict`'s lru_cache, `current_lora_hash`, each LoraLoader's `loaded_hash`, the conditioning
cache). Not reproduced: a GPU and its memory manager, low-bit storage, SDXL, prompt chunking and emphasis.

`forge_engine(checkpoint)` builds the tiny checkpoint as Forge's engine (backend/engine.py).
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

from webui_standin import load_tiny_ldm, started

STANDIN = Path(__file__).resolve().parent
LORA_EXTENSION = STANDIN / "extensions-builtin" / "sd_forge_lora"
TOP_LEVEL = ("modules", "modules_forge", "backend")


def _standin_module(name: str) -> bool:
    return name == "networks" or any(name == top or name.startswith(top + ".") for top in TOP_LEVEL)


@contextlib.contextmanager
def installed(factory: Callable, data_dir: Path, args: Sequence[str] = ()) -> Iterator:
    """The stand-in Forge for a with-block with the tiny checkpoint selected (factory builds it); yields shared."""
    with started(data_dir, args, [STANDIN, LORA_EXTENSION], _standin_module) as shared:
        sd_models = importlib.import_module("modules.sd_models")
        importlib.import_module("networks")
        shared.sd_model = sd_models.model_data.sd_model
        sd_models.model_data.factory = factory
        models = Path(data_dir) / "models" / "Stable-diffusion"
        sd_models.model_data.checkpoint = str(models / "tiny-sd1.safetensors")
        yield shared


def forge_engine(checkpoint: Path):
    """The tiny checkpoint as Forge's engine; call inside installed() (it imports the stand-in backend)."""
    from transformers import CLIPTokenizer

    from backend.engine import StableDiffusion

    import yaml

    clip_dir = yaml.safe_load(Path(checkpoint).with_suffix(".yaml").read_text())["model"]["params"][
        "cond_stage_config"]["params"]["version"]
    return StableDiffusion(load_tiny_ldm(checkpoint), CLIPTokenizer.from_pretrained(clip_dir))
