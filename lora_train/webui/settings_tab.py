"""The Settings tab: presets, the handful of settings a first run needs, and an "Advanced" group for the rest.

Layout and wiring only; the work is in `actions.py`, `form.py` and `remembered.py`. Loading a preset (or "Reset
to preset") fills every setting but the output name, which stays the one the Dataset tab proposed. Beside the
name, a note says before training when a LoRA of that name is already in the Lora folder.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List

import gradio as gr

from ..config import config_from_dict
from ..jobs import JobRunner
from . import actions, remembered
from .form import Field, config_to_values, form_fields, in_words, to_form, values_to_dict
from .host import Host

SECTIONS = ("model", "training", "data", "output")


def _field_component(field: Field):
    named = {"label": field.label, "info": field.help or None, "elem_id": f"lora_train_{field.section}_{field.name}"}
    if field.kind == "bool":
        return gr.Checkbox(value=field.default, **named)
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=field.default, **named)
    if field.optional or field.kind == "str":
        return gr.Textbox(value=to_form(field, field.default), max_lines=1, **named)
    return gr.Number(value=field.default, precision=0 if field.kind == "int" else None, **named)


def build(ui: SimpleNamespace, host: Host) -> None:
    with gr.Row():
        ui.preset = gr.Dropdown(choices=actions.list_presets(host.presets_dir()), value="default", label="Preset")
        ui.load_preset = gr.Button("Reset to preset")
        ui.preset_name = gr.Textbox(label="Save as preset", max_lines=1, placeholder="my-style")
        ui.save_preset = gr.Button("Save preset")
    ui.preset_status = gr.Markdown()
    fields, ui.inputs = form_fields(), []
    with gr.Row(equal_height=False, elem_id="lora_train_basic"):
        for field in (f for f in fields if f.basic):
            ui.inputs.append((field, _field_component(field)))
    ui.name_note = gr.Markdown(elem_id="lora_train_name_note")
    with gr.Accordion("Advanced", open=False, elem_id="lora_train_advanced"):
        for section in SECTIONS:
            gr.Markdown(f"**{section.capitalize()}**")
            with gr.Row(equal_height=False):
                for field in (f for f in fields if f.section == section and not f.basic):
                    ui.inputs.append((field, _field_component(field)))
    ui.fields = [field for field, _ in ui.inputs]
    ui.components = [component for _, component in ui.inputs]
    ui.estimate = gr.Button("Estimate steps and time")
    ui.estimate_text = gr.Markdown()


def component(ui: SimpleNamespace, key: str):
    return ui.components[[field.key for field in ui.fields].index(key)]


def preset_values(ui: SimpleNamespace, host: Host, name: str) -> List[Any]:
    """The preset's values for every component, the output name left as it is (gr.update())."""
    values = config_to_values(ui.fields, actions.load_preset(host.presets_dir(), name))
    return [gr.update() if field.key == "output.output_name" else value for field, value in zip(ui.fields, values)]


def config_values(ui: SimpleNamespace, folder: str, values: List[Any]) -> Dict[str, Dict[str, Any]]:
    config = values_to_dict(ui.fields, values)
    config["data"]["train_data_dir"] = folder
    return config


def wire(ui: SimpleNamespace, host: Host, runner: JobRunner) -> None:
    def save(name, *values):
        try:
            saved = actions.save_preset(host.presets_dir(), name, values_to_dict(ui.fields, values))
        except ValueError as error:
            return gr.update(), f"**Error:** {in_words(str(error))}"
        return (gr.update(choices=actions.list_presets(host.presets_dir()), value=saved),
                f"Saved preset **{saved}**.")

    def estimate(folder, *values):
        try:
            config = config_from_dict(config_values(ui, folder, list(values))).validate(require_base_model=False)
            last = runner.latest("train")
            report = (last.snapshot().get("report") or {}) if last else {}
            seconds, steps = report.get("seconds"), report.get("steps")
            return actions.estimate(config, seconds / steps if seconds and steps else None)
        except (ValueError, OSError) as error:
            return f"**Error:** {in_words(str(error))}"

    def pick(name):
        remembered.save(host.presets_dir(), preset=name)
        return preset_values(ui, host, name)

    ui.preset.select(pick, [ui.preset], ui.components)
    ui.load_preset.click(pick, [ui.preset], ui.components)
    ui.save_preset.click(save, [ui.preset_name, *ui.components], [ui.preset, ui.preset_status])
    ui.estimate.click(estimate, [ui.folder, *ui.components], [ui.estimate_text])
    name, overwrite = component(ui, "output.output_name"), component(ui, "output.overwrite")
    for changed in (name, overwrite):
        changed.change(lambda text, replace: remembered.name_clash(host.lora_dir(), text, replace),
                       [name, overwrite], [ui.name_note])
