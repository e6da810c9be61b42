"""The "LoRA Train" tab: dataset, caption grid and tag view, auto-captioning, settings and presets, training, test.

Layout only: every button calls a function of `actions.py` or starts a job from `tasks.py`. Works on gradio
3.41 (A1111 1.10) and 4.x (Forge): no `.style()`, styling in constructor arguments, `_js`/`js` chosen by
version. Training and captioning report through the WebUI's own progress bar (javascript/lora_train.js gives
each job a task id) and through a status line the tab polls, which "Show progress" re-attaches after a page
reload.
"""

from __future__ import annotations

import html
import time
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List

import gradio as gr

from .. import __version__
from ..caption_writer import MODES
from ..captioning import DEFAULT_MODEL
from ..tagger import TaggerOptions, parse_tag_list
from ..config import config_from_dict
from ..jobs import JobBusyError, JobRunner
from . import actions, tag_view
from ..preflight import changes_text
from .form import Field, advised_values, config_to_values, form_fields, to_form, values_to_dict
from .host import Host
from .tasks import CaptionRequest, PreviewOptions, caption_job, train_job

POLL_SECONDS = 1.0
JS_ARG = "_js" if gr.__version__.startswith("3.") else "js"


def _opt(name: str, default: Any) -> Any:
    from modules import shared

    return getattr(shared.opts, name, default) if hasattr(shared, "opts") else default


def _field_component(field: Field):
    label, info = field.name.replace("_", " "), field.help or None
    if field.kind == "bool":
        return gr.Checkbox(value=field.default, label=label, info=info)
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=field.default, label=label, info=info)
    if field.optional or field.kind == "str":
        return gr.Textbox(value=to_form(field, field.default), label=label, info=info, max_lines=1)
    return gr.Number(value=field.default, label=label, info=info, precision=0 if field.kind == "int" else None)


def _dataset_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.folder = gr.Textbox(label="Image folder", value=_opt("lora_train_dataset_root", ""), scale=4,
                               placeholder="the folder that holds your 20-200 images", elem_id="lora_train_folder")
        ui.load = gr.Button("Load", variant="primary", scale=1)
    ui.report = gr.Markdown()
    ui.grid = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], col_count=(2, "fixed"),
                           interactive=True, wrap=True, label="Captions (edit, then Save captions)")
    with gr.Row():
        ui.find = gr.Textbox(label="Find", max_lines=1)
        ui.replace = gr.Textbox(label="Replace with", max_lines=1)
        ui.do_replace = gr.Button("Replace in all")
    with gr.Row():
        ui.trigger = gr.Textbox(label="Trigger word", max_lines=1, placeholder="e.g. sks style")
        ui.add_trigger = gr.Button("Add to all")
        ui.remove_trigger = gr.Button("Remove from all")
        ui.save = gr.Button("Save captions", variant="primary")
    ui.saved = gr.Markdown()
    tag_view.build(ui)
    ui.gallery = gr.Gallery(label="Images", columns=6, height=360, elem_id="lora_train_gallery")


def _caption_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.caption_model = gr.Textbox(label="Caption model: BLIP/GIT, or a WD14 tagger (hub id or local folder)",
                                      value=_opt("lora_train_caption_model", DEFAULT_MODEL), scale=3)
        ui.caption_batch = gr.Slider(1, 64, value=8, step=1, label="Batch size")
    with gr.Row():
        ui.caption_suggestion = gr.Markdown(elem_id="lora_train_caption_suggestion")
        ui.suggested_model = gr.Textbox(visible=False)
        ui.use_suggestion = gr.Button("Use the suggested model", scale=0)
    with gr.Row():
        ui.caption_prefix = gr.Textbox(label="Prefix (trigger word)", placeholder="sks style, ", max_lines=1)
        ui.caption_suffix = gr.Textbox(label="Suffix", max_lines=1)
        ui.caption_mode = gr.Radio(list(MODES), value="skip", label="Existing captions",
                                   info="skip keeps captions you wrote or edited")
        ui.caption_max = gr.Slider(8, 150, value=75, step=1, label="Max length (BLIP/GIT)")
    tagger = TaggerOptions()
    with gr.Accordion("WD14 tagger (booru tags for Pony, Illustrious, NoobAI)", open=False), gr.Row():
        ui.tag_general = gr.Slider(0, 1, value=tagger.general_threshold, step=0.01, label="General tag threshold")
        ui.tag_character = gr.Slider(0, 1, value=tagger.character_threshold, step=0.01, label="Character threshold")
        ui.tag_exclude = gr.Textbox(label="Tags to exclude", placeholder="watermark, signature", max_lines=1)
        ui.tag_spaces = gr.Checkbox(value=tagger.underscores_to_spaces, label="Underscores to spaces")
        ui.tag_rating = gr.Checkbox(value=tagger.rating_tags, label="Rating tags")
    with gr.Row():
        ui.caption_run = gr.Button("Caption images", variant="primary")
        ui.caption_stop = gr.Button("Stop")
    ui.caption_status = gr.Markdown(elem_id="lora_train_caption_status")


def _settings_tab(ui: SimpleNamespace, host: Host) -> None:
    with gr.Row():
        ui.preset = gr.Dropdown(choices=actions.list_presets(host.presets_dir()), value="default", label="Preset")
        ui.load_preset = gr.Button("Load preset")
        ui.preset_name = gr.Textbox(label="Save as preset", max_lines=1, placeholder="my-style")
        ui.save_preset = gr.Button("Save preset")
    ui.preset_status = gr.Markdown()
    ui.fields, ui.inputs = form_fields(), []
    for section in ("model", "training", "data", "output"):
        with gr.Accordion(section.capitalize(), open=section in ("model", "training")):
            with gr.Row(equal_height=False):
                for field in (f for f in ui.fields if f.section == section):
                    ui.inputs.append((field, _field_component(field)))
    ui.fields = [field for field, _ in ui.inputs]
    ui.components = [component for _, component in ui.inputs]
    ui.estimate = gr.Button("Estimate steps and time")
    ui.estimate_text = gr.Markdown()


def _train_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.preview_every = gr.Number(value=_opt("lora_train_preview_every", 0), precision=0,
                                     label="Preview every N steps (0: off)")
        ui.preview_prompt = gr.Textbox(label="Preview prompt (empty: the first caption)", max_lines=1, scale=3)
        ui.preview_seed = gr.Number(value=1234, precision=0, label="Preview seed")
    with gr.Row():
        ui.start = gr.Button("Start training", variant="primary", elem_id="lora_train_start")
        ui.stop_save = gr.Button("Stop & save")
        ui.stop_discard = gr.Button("Stop & discard", variant="stop")
        ui.watch = gr.Button("Show progress", elem_id="lora_train_watch")
    ui.apply_advice = gr.Button("Apply the suggested settings", visible=False, elem_id="lora_train_apply_advice")
    ui.progress = gr.HTML(elem_id="lora_train_progress")
    ui.status = gr.Markdown(elem_id="lora_train_status")
    with gr.Row():
        ui.loss = gr.LinePlot(x="step", y="loss", title="Loss", height=240, width=480)
        ui.previews = gr.Gallery(label="Previews (same seed)", columns=4, height=240, elem_id="lora_train_previews")
    ui.result = gr.Markdown()


def _test_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.test_name = gr.Textbox(label="LoRA name", max_lines=1)
        ui.test_weight = gr.Slider(0, 1.5, value=0.8, step=0.05, label="Weight")
        ui.test_seed = gr.Number(value=1234, precision=0, label="Seed")
    ui.test_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="lora_train_test_prompt")
    with gr.Row():
        ui.test_run = gr.Button("Generate at the training resolution: weight 0 and the weight above, same seed",
                                variant="primary")
        ui.send = gr.Button("Send to txt2img", elem_id="lora_train_send_txt2img")
    ui.test_images = gr.Gallery(label="Without / with the LoRA", columns=2, height=420,
                                elem_id="lora_train_test_images")


def build(runner: JobRunner, host: Host) -> gr.Blocks:
    ui = SimpleNamespace()
    with gr.Blocks(analytics_enabled=False) as tab:
        ui.task_id = gr.Textbox(visible=False, elem_id="lora_train_task_id")
        with gr.Tabs():
            with gr.Tab("Dataset"):
                _dataset_tab(ui)
            with gr.Tab("Captioning") as ui.caption_section:
                _caption_tab(ui)
            with gr.Tab("Settings"):
                _settings_tab(ui, host)
            with gr.Tab("Train"):
                _train_tab(ui)
            with gr.Tab("Test"):
                _test_tab(ui)
        gr.Markdown(f"sd-webui-lora-train {__version__}", elem_id="lora_train_version")
        _wire_dataset(ui)
        tag_view.wire(ui)
        _wire_settings(ui, host, runner)
        tab.load(lambda: _preset_for_model(ui, host), None, [ui.preset, *ui.components])
        _wire_jobs(ui, runner, host)
        _wire_test(ui, host)
    return tab


def _wire_dataset(ui: SimpleNamespace) -> None:
    ui.load.click(actions.scan_folder, [ui.folder], [ui.report, ui.grid, ui.gallery])
    ui.do_replace.click(actions.replace_text, [ui.grid, ui.find, ui.replace], [ui.grid])
    ui.add_trigger.click(actions.add_trigger, [ui.grid, ui.trigger], [ui.grid])
    ui.remove_trigger.click(actions.remove_trigger, [ui.grid, ui.trigger], [ui.grid])
    ui.save.click(_guarded(actions.save_captions), [ui.folder, ui.grid], [ui.saved])


def _guarded(function, unchanged: int = 0):
    """Runs a handler and shows a user mistake as text instead of an error popup with a traceback.

    The message is the last output; the `unchanged` outputs before it are left as they were.
    """
    def run(*args):
        try:
            return function(*args)
        except (ValueError, OSError) as error:
            message = f"**Error:** {error}"
            return (*[gr.update()] * unchanged, message) if unchanged else message
    return run


def _config_values(ui: SimpleNamespace, folder: str, values: List[Any]) -> Dict[str, Dict[str, Any]]:
    config = values_to_dict(ui.fields, values)
    config["data"]["train_data_dir"] = folder
    return config


def _preset_for_model(ui: SimpleNamespace, host: Host) -> List[Any]:
    """On page load: the built-in preset of the loaded checkpoint's family (SDXL's for SDXL) filled into the
    form; for a family without its own preset the form is left as it is (the WebUI may have set its defaults)."""
    name = actions.preset_for(actions.loaded_family(host))
    if name == "default":
        return [gr.update()] * (1 + len(ui.components))
    return [name, *config_to_values(ui.fields, actions.load_preset(host.presets_dir(), name))]


def _wire_settings(ui: SimpleNamespace, host: Host, runner: JobRunner) -> None:
    def load(name):
        return config_to_values(ui.fields, actions.load_preset(host.presets_dir(), name))

    def save(name, *values):
        saved = actions.save_preset(host.presets_dir(), name, values_to_dict(ui.fields, values))
        return (gr.update(choices=actions.list_presets(host.presets_dir()), value=saved),
                f"Saved preset **{saved}**.")

    def estimate(folder, *values):
        config = config_from_dict(_config_values(ui, folder, list(values))).validate(require_base_model=False)
        last = runner.latest("train")
        status = last.snapshot() if last else {}
        seconds = (status.get("report") or {}).get("seconds")
        steps = (status.get("report") or {}).get("steps")
        return actions.estimate(config, seconds / steps if seconds and steps else None)

    ui.load_preset.click(load, [ui.preset], ui.components)
    ui.save_preset.click(_guarded(save, unchanged=1), [ui.preset_name, *ui.components], [ui.preset, ui.preset_status])
    ui.estimate.click(_guarded(estimate), [ui.folder, *ui.components], [ui.estimate_text])


def _watch(runner: JobRunner, kind: str) -> Iterator[tuple]:
    """Streams the latest job of a kind until it ends (and once more with its final state)."""
    import pandas as pd

    while True:
        view = actions.job_view(runner, kind)
        losses = pd.DataFrame({"step": range(1, len(view["losses"]) + 1), "loss": view["losses"]})
        advice = (view["status_raw"] or {}).get("advice")
        yield (view["status"], losses, view["previews"], actions.result_markdown(view["status_raw"]),
               gr.update(visible=bool(advice)))
        if not view["running"]:
            return
        time.sleep(POLL_SECONDS)


def _wire_jobs(ui: SimpleNamespace, runner: JobRunner, host: Host) -> None:
    def start_train(task_id, folder, every, prompt, seed, *values):
        preview = PreviewOptions(every_n_steps=int(every or 0), prompt=prompt or "", seed=int(seed or 0))
        return _start(runner, "train", lambda: train_job(_config_values(ui, folder, list(values)), host, preview,
                                                         task_id or None))

    def start_caption(task_id, folder, model, batch, prefix, suffix, mode, max_length, general, character,
                      exclude, spaces, rating):
        request = CaptionRequest(input=folder, model=model, batch_size=int(batch), prefix=prefix, suffix=suffix,
                                 mode=mode, max_length=int(max_length), min_length=min(5, int(max_length)),
                                 general_threshold=float(general), character_threshold=float(character),
                                 exclude_tags=list(parse_tag_list(exclude)), underscores_to_spaces=bool(spaces),
                                 rating_tags=bool(rating))
        return _start(runner, "caption", lambda: caption_job(request, host, task_id or None))

    def watch_train():  # a generator function, so that gradio streams it
        yield from _watch(runner, "train")

    def watch_caption():
        yield from _watch_caption(runner)

    def apply_advice():
        job = runner.latest("train")
        advice = job.snapshot()["advice"] if job else {}
        values = advised_values(ui.fields, advice)
        updates = [gr.update(value=values[field.key]) if field.key in values else gr.update() for field in ui.fields]
        note = (f"Applied {html.escape(changes_text(advice))} to the settings; start training again."
                if values else "No suggested settings.")
        return (*updates, note, gr.update(visible=False))

    train_outputs = [ui.status, ui.loss, ui.previews, ui.result, ui.apply_advice]
    ui.apply_advice.click(apply_advice, None, [*ui.components, ui.status, ui.apply_advice])
    ui.start.click(start_train, [ui.task_id, ui.folder, ui.preview_every, ui.preview_prompt, ui.preview_seed,
                                 *ui.components], [ui.status], **{JS_ARG: "lora_train_start"}
                   ).success(watch_train, None, train_outputs)
    ui.watch.click(watch_train, None, train_outputs)
    ui.stop_save.click(lambda: _stop(runner, "save"), None, [ui.status])
    ui.stop_discard.click(lambda: _stop(runner, "discard"), None, [ui.status])
    caption_inputs = [ui.task_id, ui.folder, ui.caption_model, ui.caption_batch, ui.caption_prefix,
                      ui.caption_suffix, ui.caption_mode, ui.caption_max, ui.tag_general, ui.tag_character,
                      ui.tag_exclude, ui.tag_spaces, ui.tag_rating]
    ui.caption_section.select(lambda: actions.caption_suggestion(host), None,
                              [ui.caption_suggestion, ui.suggested_model])
    ui.use_suggestion.click(lambda model: model, [ui.suggested_model], [ui.caption_model])
    ui.caption_run.click(start_caption, caption_inputs, [ui.caption_status], **{JS_ARG: "lora_train_start"}
                         ).success(watch_caption, None, [ui.caption_status]
                                ).then(actions.scan_folder, [ui.folder], [ui.report, ui.grid, ui.gallery])
    ui.caption_stop.click(lambda: _stop(runner, "save"), None, [ui.caption_status])
    output_name = ui.components[[field.key for field in ui.fields].index("output.output_name")]
    output_name.change(lambda name: name, [output_name], [ui.test_name])


def _watch_caption(runner: JobRunner) -> Iterator[str]:
    while True:
        view = actions.job_view(runner, "caption")
        raw = view["status_raw"] or {}
        summary = (raw.get("report") or {}).get("summary", "")
        yield view["status"] + (f"\n\n{summary}" if summary and not view["running"] else "")
        if not view["running"]:
            return
        time.sleep(POLL_SECONDS)


def _start(runner: JobRunner, kind: str, make_work) -> str:
    """Starts the job; a setting to fix is raised as gr.Error, which the page shows with its message."""
    try:
        runner.start(kind, make_work())
    except (JobBusyError, ValueError) as error:
        raise gr.Error(f"Cannot start: {error}") from None
    return "Starting..."


def _stop(runner: JobRunner, mode: str) -> str:
    job = runner.current()
    if job is None:
        return "No job is running."
    job.request_stop(mode)
    return f"Stopping after this step ({'saving' if mode == 'save' else 'discarding'} the LoRA)..."


def _wire_test(ui: SimpleNamespace, host: Host) -> None:
    def generate(name, weight, seed, prompt, size):
        if not name.strip():
            return []
        plain, size = actions.without_lora(prompt, name), int(size)
        with host.exclusive("lora_train_test"):
            without = host.generate(plain, int(seed), width=size, height=size)
            with_lora = host.generate(actions.with_lora(plain, name, weight), int(seed), width=size, height=size)
        return [(without, "weight 0"), (with_lora, f"weight {weight:g}")]

    retag = [ui.test_name, ui.test_weight, ui.test_prompt]
    ui.test_weight.change(lambda name, weight, prompt: actions.with_lora(prompt, name, weight), retag,
                          [ui.test_prompt])
    ui.test_name.change(lambda name, weight, trigger: actions.with_lora(trigger, name, weight),
                        [ui.test_name, ui.test_weight, ui.trigger], [ui.test_prompt])
    resolution = ui.components[[field.key for field in ui.fields].index("data.resolution")]
    ui.test_run.click(generate, [ui.test_name, ui.test_weight, ui.test_seed, ui.test_prompt, resolution],
                      [ui.test_images])
    _bind_send_to_txt2img(ui.send, ui.test_prompt)


def _bind_send_to_txt2img(button, prompt) -> None:
    try:
        from modules import infotext_utils
    except ImportError:  # WebUI before 1.8 named it generation_parameters_copypaste
        from modules import generation_parameters_copypaste as infotext_utils
    infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
        paste_button=button, tabname="txt2img", source_text_component=prompt))
