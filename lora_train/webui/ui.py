"""The "LoRA Train" tab: dataset, caption grid and tag view, auto-captioning, settings and presets, training, test.

Layout only: every button calls a function of `actions.py` or starts a job from `tasks.py`. Works on gradio
3.41 (A1111 1.10) and 4.x (Forge): no `.style()`, styling in constructor arguments, `_js`/`js` chosen by
version. Training and captioning report through the WebUI's own progress bar (javascript/lora_train.js gives
each job a task id) and through a status line the tab polls, which "Show progress" re-attaches after a page
reload. The last-used folder, settings and preview settings come back on page load (`remembered.py`); the Settings
tab is `settings_tab.py`. A start that cannot go ahead says why in the status line, not in a popup.
"""

from __future__ import annotations

import html
import time
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Iterator, List

import gradio as gr

from .. import __version__
from ..caption_writer import MODES
from ..captioning import DEFAULT_MODEL
from ..tagger import TaggerOptions, parse_tag_list
from ..config import ConfigError, config_from_dict
from ..jobs import JobBusyError, JobRunner
from . import actions, loss_plot, remembered, settings_tab, tag_view
from ..preflight import changes_text
from .form import advised_values, config_to_values, in_words
from .host import PREVIEW_SAMPLER, Host
from .settings_tab import component, config_values
from .tasks import CaptionRequest, PreviewOptions, caption_job, train_job

POLL_SECONDS = 1.0
JS_ARG = "_js" if gr.__version__.startswith("3.") else "js"


def _opt(name: str, default: Any) -> Any:
    from modules import shared

    return getattr(shared.opts, name, default) if hasattr(shared, "opts") else default


def _dataset_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.folder = gr.Textbox(label="Image folder", value=_opt("lora_train_dataset_root", ""), scale=4,
                               placeholder="the folder that holds your 20-200 images", elem_id="lora_train_folder")
        ui.load = gr.Button("Load", variant="primary", scale=1)
    ui.report = gr.Markdown(elem_id="lora_train_report")
    ui.grid = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], col_count=(2, "fixed"),
                           interactive=True, wrap=True, label="Captions (edit, then Save captions)",
                           elem_id="lora_train_grid")
    with gr.Row():
        ui.find = gr.Textbox(label="Find", max_lines=1)
        ui.replace = gr.Textbox(label="Replace with", max_lines=1)
        ui.do_replace = gr.Button("Replace in all")
    with gr.Row():
        ui.trigger = gr.Textbox(label="Trigger word", max_lines=1, placeholder="e.g. sks style")
        ui.add_trigger = gr.Button("Add to all")
        ui.remove_trigger = gr.Button("Remove from all")
        ui.save = gr.Button("Save captions", variant="primary", elem_id="lora_train_save_captions")
    ui.saved = gr.Markdown(elem_id="lora_train_saved")
    tag_view.build(ui)
    ui.gallery = gr.Gallery(label="Images", columns=6, height=360, elem_id="lora_train_gallery")


def _caption_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.caption_model = gr.Textbox(label="Caption model: BLIP/GIT, or a WD14 tagger (hub id or local folder)",
                                      value=_opt("lora_train_caption_model", DEFAULT_MODEL), scale=3,
                                      elem_id="lora_train_caption_model")
        ui.caption_batch = gr.Slider(1, 64, value=8, step=1, label="Batch size")
    with gr.Row():
        ui.caption_suggestion = gr.Markdown(elem_id="lora_train_caption_suggestion")
        ui.suggested_model = gr.Textbox(visible=False)
        ui.use_suggestion = gr.Button("Use the suggested model", scale=0)
    with gr.Row():
        ui.caption_prefix = gr.Textbox(label="Prefix (trigger word)", placeholder="sks style, ", max_lines=1,
                                       elem_id="lora_train_caption_prefix")
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


def _train_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.preview_every = gr.Number(value=_opt("lora_train_preview_every", 0), precision=0,
                                     label="Preview every N steps (0: off)", elem_id="lora_train_preview_every")
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
        ui.loss = gr.HTML(loss_plot.svg([]), elem_id="lora_train_loss")
        ui.previews = gr.Gallery(label="Previews (same seed)", columns=4, height=240, elem_id="lora_train_previews")
    ui.result = gr.Markdown()


def _test_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.test_name = gr.Textbox(label="LoRA name", max_lines=1, elem_id="lora_train_test_name")
        ui.test_weight = gr.Slider(0, 1.5, value=0.8, step=0.05, label="Weight")
        ui.test_seed = gr.Number(value=1234, precision=0, label="Seed")
    ui.test_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="lora_train_test_prompt")
    with gr.Row():
        ui.test_run = gr.Button("Generate at the training resolution: weight 0 and the weight above, same seed",
                                variant="primary")
        ui.send = gr.Button("Send to txt2img", elem_id="lora_train_send_txt2img")
    ui.test_infotext = gr.Textbox(visible=False, elem_id="lora_train_test_infotext")
    ui.test_images = gr.Gallery(label="Without / with the LoRA", columns=2, height=420,
                                elem_id="lora_train_test_images")


def build(runner: JobRunner, host: Host) -> gr.Blocks:
    ui = SimpleNamespace()
    with gr.Blocks(analytics_enabled=False) as tab:
        ui.task_id = gr.Textbox(visible=False, elem_id="lora_train_task_id")
        ui.started = gr.State(False)
        with gr.Tabs():
            with gr.Tab("Dataset"):
                _dataset_tab(ui)
            with gr.Tab("Captioning") as ui.caption_section:
                _caption_tab(ui)
            with gr.Tab("Settings"):
                settings_tab.build(ui, host)
            with gr.Tab("Train"):
                _train_tab(ui)
            with gr.Tab("Test"):
                _test_tab(ui)
        gr.Markdown(f"sd-webui-lora-train {__version__}", elem_id="lora_train_version")
        _wire_dataset(ui, host)
        tag_view.wire(ui)
        settings_tab.wire(ui, host, runner)
        tab.load(lambda: _page_load(ui, host, runner), None, _remembered_components(ui))
        _wire_jobs(ui, runner, host)
        _wire_test(ui, host)
    return tab


def _remembered_components(ui: SimpleNamespace) -> List[Any]:
    return [ui.folder, ui.report, ui.grid, ui.gallery, ui.preset, *ui.components, ui.preview_every,
            ui.preview_prompt, ui.preview_seed, ui.test_name]


def _page_load(ui: SimpleNamespace, host: Host, runner: JobRunner) -> List[Any]:
    """On page load: the last-used folder (loaded), settings and preview settings; without them, the preset of
    the loaded checkpoint's family (SDXL's for SDXL), or the form as it is (the WebUI may have set its defaults).
    The Test tab gets the name of the last LoRA trained (by this WebUI process, else as remembered)."""
    saved = remembered.load(host.presets_dir())
    try:
        config = config_from_dict(saved["config"]) if saved.get("config") else None
    except ConfigError:  # a setting this version no longer has
        config = None
    if config is None:
        settings = _preset_for_model(ui, host)
    else:
        preset = saved.get("preset") if saved.get("preset") in actions.list_presets(host.presets_dir()) else "default"
        settings = [preset, *config_to_values(ui.fields, config)]
    preview = saved.get("preview") or {}
    last = runner.latest("train")
    output = last.snapshot()["output"] if last else None
    trained = Path(output).stem if output else saved.get("trained")
    folder = saved.get("folder")
    dataset = actions.scan_folder(folder) if folder else [gr.update()] * 3
    return [folder or gr.update(), *dataset, *settings,
            *[preview.get(key, gr.update()) for key in ("every_n_steps", "prompt", "seed")], trained or gr.update()]


def _preset_for_model(ui: SimpleNamespace, host: Host) -> List[Any]:
    name = actions.preset_for(actions.loaded_family(host))
    if name == "default":
        return [gr.update()] * (1 + len(ui.components))
    return [name, *settings_tab.preset_values(ui, host, name)]


def _wire_dataset(ui: SimpleNamespace, host: Host) -> None:
    def load(folder, name):
        last = remembered.load(host.presets_dir()).get("folder")
        remembered.save(host.presets_dir(), folder=folder)
        return (*actions.scan_folder(folder), remembered.proposed_name(host.lora_dir(), name, folder, last))

    name = component(ui, "output.output_name")
    ui.load.click(load, [ui.folder, name], [ui.report, ui.grid, ui.gallery, name])
    ui.do_replace.click(actions.replace_text, [ui.grid, ui.find, ui.replace], [ui.grid])
    ui.add_trigger.click(actions.add_trigger, [ui.grid, ui.trigger], [ui.grid])
    ui.remove_trigger.click(actions.remove_trigger, [ui.grid, ui.trigger], [ui.grid])
    ui.save.click(_guarded(actions.save_captions), [ui.folder, ui.grid], [ui.saved])
    ui.grid.change(_gallery, [ui.folder, ui.grid], [ui.gallery])


def _gallery(folder, rows):
    """The gallery follows the grid's edits; rows of another folder (typed over, not loaded) leave it alone."""
    try:
        return actions.gallery_items(folder, rows)
    except ValueError:
        return gr.update()


def _guarded(function):
    """Runs a handler and shows a user mistake as text (in words, the key after) instead of an error popup."""
    def run(*args):
        try:
            return function(*args)
        except (ValueError, OSError) as error:
            return f"**Error:** {in_words(str(error))}"
    return run


def _watch(runner: JobRunner, host: Host, folder: str, name: str) -> Iterator[tuple]:
    """Streams the latest train job until it ends; then proposes the next output name and names the LoRA to test."""
    while True:
        view = actions.job_view(runner, "train")
        raw = view["status_raw"] or {}
        unchanged = [gr.update()] * 3
        if not view["running"] and raw.get("output"):
            remembered.save(host.presets_dir(), trained=Path(raw["output"]).stem)
            proposed = remembered.proposed_name(host.lora_dir(), name, folder)
            unchanged = [proposed, remembered.name_clash(host.lora_dir(), proposed, False), Path(raw["output"]).stem]
        yield (view["status"], loss_plot.svg(view["losses"]), view["previews"], actions.result_markdown(raw or None),
               gr.update(visible=bool(raw.get("advice"))), *unchanged)
        if not view["running"]:
            return
        time.sleep(POLL_SECONDS)


def _wire_jobs(ui: SimpleNamespace, runner: JobRunner, host: Host) -> None:
    name = component(ui, "output.output_name")

    def start_train(task_id, folder, preset, every, prompt, seed, *values):
        config = config_values(ui, folder, list(values))
        wanted = config["output"]["output_name"]
        if remembered.name_clash(host.lora_dir(), wanted, config["output"]["overwrite"]):
            config["output"]["output_name"] = remembered.proposed_name(host.lora_dir(), wanted, folder)
        note = remembered.name_clash(host.lora_dir(), config["output"]["output_name"], config["output"]["overwrite"])
        if note:
            host.end_task(task_id)
            return f"**Cannot start:** {note}", False, gr.update(), note
        preview = PreviewOptions(every_n_steps=int(every or 0), prompt=prompt or "", seed=int(seed or 0))
        try:
            runner.check_free()  # busy first, as the API answers
            runner.start("train", train_job(config, host, preview, task_id or None))
        except (JobBusyError, ValueError) as error:
            host.end_task(task_id)
            return f"**Cannot start:** {html.escape(in_words(str(error)))}", False, gr.update(), gr.update()
        remembered.save(host.presets_dir(), folder=folder, preset=preset, config=config,
                        preview={"every_n_steps": int(every or 0), "prompt": prompt or "", "seed": int(seed or 0)})
        return "Starting...", True, config["output"]["output_name"], ""

    def watch_train(folder, current_name, started=True):  # a generator function, so that gradio streams it
        if started:
            yield from _watch(runner, host, folder, current_name)
        else:  # the start was refused; its message stays
            yield tuple(gr.update() for _ in train_outputs)

    def apply_advice():
        job = runner.latest("train")
        advice = job.snapshot()["advice"] if job else {}
        values = advised_values(ui.fields, advice)
        updates = [gr.update(value=values[field.key]) if field.key in values else gr.update() for field in ui.fields]
        note = (f"Applied {html.escape(changes_text(advice))} to the settings; start training again."
                if values else "No suggested settings.")
        return (*updates, note, gr.update(visible=False))

    train_outputs = [ui.status, ui.loss, ui.previews, ui.result, ui.apply_advice, name, ui.name_note, ui.test_name]
    ui.apply_advice.click(apply_advice, None, [*ui.components, ui.status, ui.apply_advice])
    ui.start.click(start_train, [ui.task_id, ui.folder, ui.preset, ui.preview_every, ui.preview_prompt,
                                 ui.preview_seed, *ui.components], [ui.status, ui.started, name, ui.name_note],
                   **{JS_ARG: "lora_train_start"}).then(watch_train, [ui.folder, name, ui.started], train_outputs)
    ui.watch.click(watch_train, [ui.folder, name], train_outputs)
    ui.stop_save.click(lambda: _stop(runner, "save"), None, [ui.status])
    ui.stop_discard.click(lambda: _stop(runner, "discard"), None, [ui.status])
    _wire_caption(ui, runner, host)


def _wire_caption(ui: SimpleNamespace, runner: JobRunner, host: Host) -> None:
    def start_caption(task_id, folder, model, batch, prefix, suffix, mode, max_length, general, character,
                      exclude, spaces, rating):
        request = CaptionRequest(input=folder, model=model, batch_size=int(batch), prefix=prefix, suffix=suffix,
                                 mode=mode, max_length=int(max_length), min_length=min(5, int(max_length)),
                                 general_threshold=float(general), character_threshold=float(character),
                                 exclude_tags=list(parse_tag_list(exclude)), underscores_to_spaces=bool(spaces),
                                 rating_tags=bool(rating))
        try:
            runner.start("caption", caption_job(request, host, task_id or None))
        except (JobBusyError, ValueError) as error:
            host.end_task(task_id)
            raise gr.Error(f"Cannot start: {in_words(str(error))}") from None
        return "Starting..."

    def watch_caption():
        yield from _watch_caption(runner)

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


def _watch_caption(runner: JobRunner) -> Iterator[str]:
    while True:
        view = actions.job_view(runner, "caption")
        raw = view["status_raw"] or {}
        summary = (raw.get("report") or {}).get("summary", "")
        yield view["status"] + (f"\n\n{summary}" if summary and not view["running"] else "")
        if not view["running"]:
            return
        time.sleep(POLL_SECONDS)


def _stop(runner: JobRunner, mode: str) -> str:
    job = runner.current()
    if job is None:
        return "No job is running."
    job.request_stop(mode)
    return f"Stopping now ({'saving' if mode == 'save' else 'discarding'} the LoRA)..."


TEST_STEPS = 20  # the sampling steps of the test images (and of txt2img after "Send to txt2img")


def _wire_test(ui: SimpleNamespace, host: Host) -> None:
    def generate(name, weight, seed, prompt, size):
        if not name.strip():
            return [], gr.update()
        plain, size = actions.without_lora(prompt, name), int(size)
        with host.exclusive("lora_train_test"):
            without = host.generate(plain, int(seed), TEST_STEPS, size, size)
            with_lora = host.generate(actions.with_lora(plain, name, weight), int(seed), TEST_STEPS, size, size)
        return [(without, "weight 0"), (with_lora, f"weight {weight:g}")], infotext(prompt, seed, size)

    def infotext(prompt, seed, size):
        return actions.infotext(prompt, int(seed or 0), int(size or 512), TEST_STEPS, PREVIEW_SAMPLER)

    resolution = component(ui, "data.resolution")
    ui.test_weight.change(lambda name, weight, prompt: actions.with_lora(prompt, name, weight),
                          [ui.test_name, ui.test_weight, ui.test_prompt], [ui.test_prompt])
    ui.test_name.change(lambda name, weight, rows, trigger: actions.with_lora(
        actions.caption_trigger(rows) or trigger, name, weight), [ui.test_name, ui.test_weight, ui.grid, ui.trigger],
        [ui.test_prompt])
    for changed in (ui.test_prompt, ui.test_seed, resolution):
        changed.change(infotext, [ui.test_prompt, ui.test_seed, resolution], [ui.test_infotext])
    ui.test_run.click(generate, [ui.test_name, ui.test_weight, ui.test_seed, ui.test_prompt, resolution],
                      [ui.test_images, ui.test_infotext])
    _bind_send_to_txt2img(ui.send, ui.test_infotext)


def _bind_send_to_txt2img(button, infotext) -> None:
    """The WebUI's own paste: it parses the infotext into prompt, steps, sampler, seed and size."""
    try:
        from modules import infotext_utils
    except ImportError:  # WebUI before 1.8 named it generation_parameters_copypaste
        from modules import generation_parameters_copypaste as infotext_utils
    infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
        paste_button=button, tabname="txt2img", source_text_component=infotext))
