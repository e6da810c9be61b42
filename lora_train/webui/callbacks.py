"""What `scripts/lora_train_tab.py` registers with the WebUI: the tab, its settings, the API routes.

One `JobRunner` and one `Host` (picked once, for the WebUI this is) serve the tab and the API, so a job started
in one is visible and stoppable from the other. Heavy modules (torch, gradio, the trainer) load only when a
callback runs.
"""

from __future__ import annotations

from ..jobs import JobRunner
from .host import Host


def pick_host() -> Host:
    """The host for the WebUI this process runs: Forge (detected by its `modules_forge`), else A1111."""
    from .forge import ForgeHost, is_forge

    if is_forge():
        return ForgeHost()
    from .a1111 import A1111Host

    return A1111Host()


SECTION = ("lora_train", "LoRA Train")  # settings page section; listed under the "training" category
RUNNER = JobRunner()
HOST = pick_host()


def ui_tabs():
    from . import ui

    return [(ui.build(RUNNER, HOST), "LoRA Train", "lora_train")]


def ui_settings() -> None:
    import gradio as gr
    from modules import shared

    from ..captioning import DEFAULT_MODEL

    options = {
        "lora_train_dataset_root": shared.OptionInfo("", "Default dataset folder", gr.Textbox, section=SECTION,
                                                     category_id="training"),
        "lora_train_caption_model": shared.OptionInfo(DEFAULT_MODEL, "Caption model (hub id or local folder)",
                                                      gr.Textbox, section=SECTION, category_id="training"),
        "lora_train_preview_every": shared.OptionInfo(
            0, "Preview image every N training steps (0: off)", gr.Slider,
            {"minimum": 0, "maximum": 1000, "step": 10}, section=SECTION, category_id="training"),
    }
    for key, info in options.items():
        shared.opts.add_option(key, info)


def app_started(_demo, app) -> None:
    from modules import shared

    from . import api

    api.register(app, RUNNER, HOST, api_auth=getattr(shared.cmd_opts, "api_auth", None))


def script_unloaded() -> None:
    """Nothing was patched; a running job is asked to stop and save."""
    job = RUNNER.current()
    if job is not None:
        job.request_stop("save")
