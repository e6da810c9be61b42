"""The tab's handlers as gradio wires them, on the stand-in WebUI: what is remembered across page reloads and
restarts, the proposed output name and its clash note, a refused start without a popup, the test prompt and
what "Send to txt2img" carries, and the loss plot and error wording they show."""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr
import pytest

from lora_train.jobs import JobRunner
from lora_train.webui import loss_plot, remembered, ui
from lora_train.webui.a1111 import A1111Host
from lora_train.webui.form import in_words
from webui_standin import installed

JOB_TIMEOUT_S = 120
TINY_SETTINGS = {"Resolution": 64, "Min bucket size": "64", "Max bucket size": "128", "LoRA rank": 4,
                 "LoRA alpha": 4, "Batch size": 4, "Max train steps (empty: epochs decide)": "2",
                 "Learning rate": 3e-3, "Preview seed": 77}
NAME_LABEL = "Output name (the LoRA's file name)"


@pytest.fixture
def webui(tiny_ldm, tmp_path):
    with installed(tiny_ldm, tmp_path / "webui") as shared:
        yield shared


class Tab:
    """A built tab whose handlers are called as the page would: by the component and event that trigger them."""

    def __init__(self, runner: JobRunner, host: A1111Host):
        self.blocks = ui.build(runner, host)

    def block(self, name: str):
        """The component with this label or elem_id, or the button with this text."""
        [found] = [b for b in self.blocks.blocks.values() if name in (getattr(b, "label", None),
                                                                       getattr(b, "elem_id", None))
                   or (isinstance(b, gr.Button) and b.value == name)]
        return found

    def call(self, name: str, event: str, **values):
        """Runs every handler of `event` on component `name` with the inputs' current values (or `values`, by
        label or elem_id); returns {label and elem_id: output} (a generator's last output)."""
        target, outputs = self.block(name), {}
        for index, dependency in enumerate(self.blocks.dependencies):
            if target._id in dependency["targets"] and dependency["trigger"] == event:
                inputs = [self.blocks.blocks[i] for i in dependency["inputs"]]
                args = [values.get(b.label, values.get(b.elem_id, b.value)) for b in inputs]
                outputs.update(self._named(dependency, self.blocks.fns[index].fn(*args)))
        assert outputs, f"no {event} handler on {name}"
        return outputs

    def _named(self, dependency, result):
        if hasattr(result, "__next__"):
            result = list(result)[-1]
        result = result if isinstance(result, (tuple, list)) and len(dependency["outputs"]) > 1 else [result]
        named = {}
        for block, value in zip((self.blocks.blocks[i] for i in dependency["outputs"]), result):
            named.update({key: value for key in (block.label, block.elem_id) if key})
        return named

    def page_load(self):
        [dependency] = [d for d in self.blocks.dependencies if d["trigger"] == "load"]
        return self._named(dependency, self.blocks.fns[self.blocks.dependencies.index(dependency)].fn())


def start(tab: Tab, folder: Path, **settings):
    return tab.call("Start training", "click", lora_train_folder=str(folder), **{**TINY_SETTINGS, **settings})


def wait(runner: JobRunner) -> dict:
    job = runner.latest("train")
    assert job is not None, "no job was started"
    assert job.done.wait(JOB_TIMEOUT_S)
    return job.snapshot()


def test_the_name_comes_from_the_folder_and_is_made_unique_against_the_lora_folder(webui, sample_images):
    host = A1111Host()
    tab = Tab(JobRunner(), host)
    assert tab.call("Load", "click", lora_train_folder=str(sample_images))[NAME_LABEL] == "images"
    host.lora_dir().mkdir(parents=True)
    (host.lora_dir() / "images.safetensors").write_bytes(b"an earlier run")
    loaded = tab.call("Load", "click", lora_train_folder=str(sample_images), **{NAME_LABEL: "images"})
    assert loaded[NAME_LABEL] == "images_2"
    kept = tab.call("Load", "click", lora_train_folder=str(sample_images), **{NAME_LABEL: "my own name"})
    assert kept[NAME_LABEL] == "my own name", "a name the user typed is kept"
    note = tab.call(NAME_LABEL, "change", **{NAME_LABEL: "images"})["lora_train_name_note"]
    assert note.startswith("**images.safetensors** is already in the Lora folder") and "`images_2` is free" in note
    assert tab.call(NAME_LABEL, "change", **{NAME_LABEL: "images_2"})["lora_train_name_note"] == ""


def test_a_clash_refuses_the_start_in_the_status_line_and_ends_the_pages_wait(webui, sample_images):
    from modules import progress

    host, runner = A1111Host(), JobRunner()
    host.lora_dir().mkdir(parents=True)
    (host.lora_dir() / "mine.safetensors").write_bytes(b"an earlier run")
    tab = Tab(runner, host)
    refused = start(tab, sample_images, **{NAME_LABEL: "mine", "lora_train_task_id": "task(clash)"})
    assert refused["lora_train_status"].startswith("**Cannot start:** **mine.safetensors** is already")
    assert refused["lora_train_name_note"] == refused["lora_train_status"][len("**Cannot start:** "):]
    assert runner.latest() is None and "task(clash)" in progress.finished_tasks


def test_a_clash_of_the_proposed_name_trains_the_next_free_one(webui, sample_images):
    host, runner = A1111Host(), JobRunner()
    host.lora_dir().mkdir(parents=True)
    (host.lora_dir() / "images.safetensors").write_bytes(b"an earlier run")
    tab = Tab(runner, host)
    started = start(tab, sample_images, **{NAME_LABEL: "images"})
    assert started["lora_train_status"] == "Starting..." and started[NAME_LABEL] == "images_2"
    status = wait(runner)
    assert status["state"] == "done" and Path(status["output"]).name == "images_2.safetensors", status["error"]
    ended = tab.call("Show progress", "click", lora_train_folder=str(sample_images), **{NAME_LABEL: "images_2"})
    assert ended[NAME_LABEL] == "images_3", "the next run gets a free name"
    assert ended["LoRA name"] == "images_2", "the Test tab tests the LoRA just trained"
    assert ended["lora_train_status"].startswith("**Done.** 2 steps in ")
    assert "ETA" not in ended["lora_train_status"]
    assert [caption for _, caption in ended["Previews (same seed)"]] == []


def test_settings_and_folder_come_back_after_a_reload_and_a_restart(webui, sample_images, tmp_path):
    host, runner = A1111Host(), JobRunner()
    assert start(Tab(runner, host), sample_images, **{NAME_LABEL: "kept", "Train text encoder": False,
                                                        "Preview every N steps (0: off)": 1})["lora_train_status"] \
        == "Starting..."
    wait(runner)
    restarted = Tab(JobRunner(), A1111Host()).page_load()  # a new runner: nothing survives but the file
    assert restarted["lora_train_folder"] == str(sample_images)
    assert len(restarted["Captions (edit, then Save captions)"]) == 8, "the folder is loaded again"
    assert (restarted["Resolution"], restarted["LoRA rank"], restarted["Train text encoder"]) == (64, 4, False)
    assert (restarted["Min bucket size"], restarted[NAME_LABEL]) == ("64", "kept")
    assert (restarted["Preview every N steps (0: off)"], restarted["Preview seed"]) == (1, 77)
    assert (host.presets_dir() / remembered.FILE_NAME).is_file()
    reloaded = Tab(runner, host).page_load()
    assert reloaded["LoRA name"] == "kept", "a reload knows the LoRA the last run wrote"


def test_reset_to_preset_fills_every_setting_but_the_name(webui, sample_images):
    tab = Tab(JobRunner(), A1111Host())
    reset = tab.call("Reset to preset", "click", Preset="sdxl")
    assert (reset["Resolution"], reset["LoRA rank"]) == (1024, 16)
    assert reset[NAME_LABEL] == gr.update()


def test_the_test_prompt_starts_with_the_captions_trigger_word_and_send_carries_the_generation(webui):
    tab = Tab(JobRunner(), A1111Host())
    rows = [["a.png", "Zyx style, a cat"], ["b.png", "zyx style, a dog"], ["c.png", "a bird"]]
    prompt = tab.call("LoRA name", "change", **{"LoRA name": "zyx", "Weight": 0.8,
                                                 "Captions (edit, then Save captions)": rows, "Trigger word": "other"})
    assert prompt["lora_train_test_prompt"] == "<lora:zyx:0.8>, Zyx style"
    generated = tab.call("Generate at the training resolution: weight 0 and the weight above, same seed", "click",
                         **{"LoRA name": "zyx", "Seed": 99, "lora_train_test_prompt": "<lora:zyx:0.8>, Zyx style",
                            "Resolution": 64})
    assert [caption for _, caption in generated["Without / with the LoRA"]] == ["weight 0", "weight 0.8"]
    assert generated["lora_train_test_infotext"] == \
        "<lora:zyx:0.8>, Zyx style\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 99, Size: 64x64"
    from modules import infotext_utils

    [binding] = infotext_utils.registered_param_bindings[-1:]
    assert binding.source_text_component is tab.block("lora_train_test_infotext")


def test_the_gallery_shows_the_captions_as_edited(webui, sample_images):
    tab = Tab(JobRunner(), A1111Host())
    rows = [["00_red_circle.png", "edited caption"]]
    gallery = tab.call("Captions (edit, then Save captions)", "change", lora_train_folder=str(sample_images),
                       **{"Captions (edit, then Save captions)": rows})["lora_train_gallery"]
    assert gallery == [(str(sample_images.resolve() / "00_red_circle.png"), "edited caption")]


def test_the_loss_plot_draws_every_point_and_a_smoothed_line():
    losses = [0.5, 0.1, None, 0.3, 0.2]
    plot = loss_plot.svg(losses)
    assert plot.count("<circle") == 4 and plot.count("<polyline") == 1
    assert "step 5" in plot and "0.5" in plot and "0.1" in plot
    assert loss_plot.smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0]), "no pull towards 0 at the start"
    assert loss_plot.smoothed([0.0, 1.0], weight=0.5) == pytest.approx([0.0, 2 / 3])
    assert "after the first step" in loss_plot.svg([])


@pytest.mark.parametrize("message, words", [
    ("data.min_bucket_reso: resolution 128 is below the smallest bucket size (256): lower data.min_bucket_reso",
     "Resolution 128 is below the smallest bucket size (256): lower Min bucket size (data.min_bucket_reso)"),
    ("training.learning_rate: 5 is not valid; use a value in (0, 1], e.g. 1e-4",
     "Learning rate: 5 is not valid; use a value in (0, 1], e.g. 1e-4 (training.learning_rate)"),
    ("no bucket with an area <= 512**2", "no bucket with an area <= 512 x 512"),
])
def test_errors_say_it_in_words_first_and_the_key_after(message, words):
    assert in_words(message) == words


def test_a_damaged_remembered_file_is_ignored(tmp_path):
    (tmp_path / remembered.FILE_NAME).write_text("{not json")
    assert remembered.load(tmp_path) == {}
    remembered.save(tmp_path, folder="/data/my style!")
    assert remembered.load(tmp_path) == {"folder": "/data/my style!"}
    assert remembered.name_for_folder("/data/my style!/") == "my_style"
    assert re.fullmatch(r"lora", remembered.name_for_folder("/"))
