"""The tab's handlers without gradio: the caption grid and tag view, presets, the settings form, the test prompt,
the caption model suggestion."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from pathlib import Path

import pytest

from lora_train.config import ConfigError, TrainConfig, config_from_dict
from lora_train.jobs import JobResult, JobRunner
from lora_train.webui import actions, status_text
from lora_train.webui.form import MANAGED, advised_values, config_to_values, form_fields, values_to_dict


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_scan_lists_images_with_captions_and_a_report(sample_images):
    report, rows, gallery = actions.scan_folder(str(sample_images))
    assert "**8 images.**" in report and len(rows) == len(gallery) == 8
    assert rows[0] == ["00_red_circle.png", "demo style, a red circle, plain background"]


def test_scan_of_a_missing_folder_says_what_to_do(tmp_path):
    report, rows, _ = actions.scan_folder(str(tmp_path / "nope"))
    assert "is not a folder" in report and rows == []


def test_save_writes_only_changed_captions(sample_images):
    _, rows, _ = actions.scan_folder(str(sample_images))
    before = digests(sample_images)
    rows[1][1] = "demo style, a red box"
    assert actions.save_captions(str(sample_images), rows) == "Saved 1 changed caption (8 images)."
    after = digests(sample_images)
    assert [name for name in after if after[name] != before[name]] == ["01_red_square.txt"]
    assert (sample_images / "01_red_square.txt").read_text() == "demo style, a red box"


def test_save_refuses_a_path_outside_the_folder(sample_images, tmp_path):
    with pytest.raises(ValueError, match="not inside the image folder"):
        actions.save_captions(str(sample_images), [["../escape.png", "x"]])
    assert not (tmp_path / "escape.txt").exists()


def test_grid_edits_find_replace_and_trigger_words():
    rows = [["a.png", "demo style, a red circle"], ["b.png", "a blue square"]]
    assert actions.replace_text(rows, "red", "green")[0][1] == "demo style, a green circle"
    added = actions.add_trigger(rows, "demo style")
    assert [caption for _, caption in added] == ["demo style, a red circle", "demo style, a blue square"]
    assert [c for _, c in actions.remove_trigger(added, "demo style")] == ["a red circle", "a blue square"]


def test_presets_round_trip_and_bad_names_are_refused(tmp_path):
    fields = form_fields()
    values = config_to_values(fields, TrainConfig())
    values[[f.key for f in fields].index("model.lora_rank")] = 16
    assert actions.save_preset(tmp_path, "my-style", values_to_dict(fields, values)) == "my-style"
    assert actions.list_presets(tmp_path) == ["default", "sdxl", "my-style"]
    assert actions.load_preset(tmp_path, "my-style").model.lora_rank == 16
    assert actions.load_preset(tmp_path, "default") == actions.load_preset(tmp_path, "")
    with pytest.raises(ConfigError, match="preset name"):
        actions.save_preset(tmp_path, "../x", values_to_dict(fields, values))


def test_form_covers_every_key_but_the_managed_ones_and_round_trips_the_defaults():
    fields = form_fields()
    every = {f"{s.name}.{f.name}" for s in dataclasses.fields(TrainConfig)
             for f in dataclasses.fields(getattr(TrainConfig(), s.name))}
    assert {field.key for field in fields} == every - MANAGED
    assert all(field.help for field in fields), "every field shows its YAML comment"
    config = config_from_dict(values_to_dict(fields, config_to_values(fields, TrainConfig())))
    assert config == TrainConfig()


def test_optional_form_text_becomes_numbers_or_none():
    fields = form_fields()
    values = config_to_values(fields, TrainConfig())
    keys = [f.key for f in fields]
    values[keys.index("training.max_train_steps")] = " 300 "
    values[keys.index("training.min_snr_gamma")] = ""
    config = config_from_dict(values_to_dict(fields, values))
    assert config.training.max_train_steps == 300 and config.training.min_snr_gamma is None


def test_test_prompt_tags():
    assert actions.with_lora("sks style, a cat", "mine", 0.8) == "<lora:mine:0.8>, sks style, a cat"
    assert actions.with_lora("<lora:mine:0.8>, a cat", "mine", 1.2) == "<lora:mine:1.2>, a cat"
    assert actions.without_lora("<lora:mine:0.8>, a cat, <lora:other:1>", "mine") == "a cat, <lora:other:1>"


def test_estimate_counts_steps(sample_images):
    config = config_from_dict({"data": {"train_data_dir": str(sample_images), "resolution": 64,
                                        "min_bucket_reso": 64, "max_bucket_reso": 128},
                               "training": {"batch_size": 2, "epochs": 3}})
    text = actions.estimate(config, seconds_per_step=2.0)
    assert text.startswith("**12 steps** (4 per epoch x 3 epochs)") and "about 0.4 min" in text


def test_advice_becomes_form_values_for_the_advised_fields_only():
    fields = form_fields()
    values = advised_values(fields, {"training.batch_size": 2, "training.gradient_checkpointing": True,
                                     "data.resolution": 384, "model.base_model": "not a field"})
    assert values == {"training.batch_size": 2, "training.gradient_checkpointing": True, "data.resolution": 384}


TAGGED = {"a.png": "1girl, Solo, red hair", "b.png": "1girl, smile", "10_set/c.png": "1girl, solo, smile, smile"}


@pytest.fixture
def tagged_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "tagged"
    for name, caption in TAGGED.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), "red").save(path)
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return folder


def test_tag_view_counts_what_ss_tag_frequency_records(tagged_folder):
    from collections import Counter

    from lora_train.config import DataConfig
    from lora_train.dataset import load_dataset

    _, rows, _ = actions.scan_folder(str(tagged_folder))
    table = actions.tag_table(rows)
    recorded = Counter()
    for counts in load_dataset(DataConfig(train_data_dir=str(tagged_folder))).tag_frequency().values():
        recorded.update(counts)
    assert table == [["1girl", 3], ["smile", 3], ["solo", 2], ["red hair", 1]]
    assert dict(map(tuple, table)) == dict(recorded)
    assert actions.tag_in_row(table, 2) == "solo" and actions.tag_in_row(table, 9) == ""


def test_clicking_a_tag_lists_its_images(tagged_folder):
    _, rows, _ = actions.scan_folder(str(tagged_folder))
    images = actions.images_with_tag(str(tagged_folder), rows, "SOLO")
    assert [Path(path).relative_to(tagged_folder).as_posix() for path, _ in images] == ["10_set/c.png", "a.png"]
    assert actions.images_with_tag(str(tagged_folder), rows, "so") == [], "whole tags only"


def test_rename_and_remove_a_tag_in_every_caption_then_save(tagged_folder):
    _, rows, _ = actions.scan_folder(str(tagged_folder))
    renamed = dict(actions.rename_tag(rows, "solo", "smile"))
    assert renamed == {"10_set/c.png": "1girl, smile", "a.png": "1girl, smile, red hair", "b.png": "1girl, smile"}
    removed = dict(actions.remove_tag(rows, " Smile "))
    assert removed == {"10_set/c.png": "1girl, solo", "a.png": "1girl, Solo, red hair", "b.png": "1girl"}
    assert actions.rename_tag(rows, "", "x") == rows
    actions.save_captions(str(tagged_folder), actions.remove_tag(rows, "1girl"))
    assert (tagged_folder / "b.txt").read_text(encoding="utf-8") == "smile"
    assert (tagged_folder / "a.txt").read_text(encoding="utf-8") == "Solo, red hair"


class FactsHost:
    def __init__(self, facts=None):
        self.facts = facts

    def checkpoint_facts(self):
        from lora_train.webui.host import HostError

        if self.facts is None:
            raise HostError("no checkpoint is loaded")
        return self.facts


def test_the_tab_suggests_the_tagger_for_a_booru_sdxl_checkpoint_and_blip_otherwise():
    from lora_train.captioning import DEFAULT_MODEL
    from lora_train.tagger import DEFAULT_TAGGER
    from lora_train.webui.host import CheckpointFacts

    text, model = actions.caption_suggestion(FactsHost(CheckpointFacts("noobaiXL_vPred10", "sdxl")))
    assert model == DEFAULT_TAGGER and "noobaiXL_vPred10" in text and DEFAULT_TAGGER in text
    text, model = actions.caption_suggestion(FactsHost(CheckpointFacts("sd_xl_base_1.0", "sdxl", {"a": "b"})))
    assert model == DEFAULT_MODEL and "no sign of booru" in text
    assert actions.caption_suggestion(FactsHost()) == ("Load a checkpoint to get a caption model suggestion.",
                                                       DEFAULT_MODEL)


def test_the_status_line_says_a_stop_is_under_way_and_keeps_no_progress_figures_at_the_end():
    runner, release = JobRunner(), threading.Event()

    def work(job):
        job.update(message="step 3/10, loss 0.1000, 1.0 s/step, ETA 7 s", eta_s=7.0)
        release.wait(10)
        return JobResult(state="stopped", message="stopped at step 3/10 in 5 s; the LoRA was discarded")

    job = runner.start("train", work)
    while not job.snapshot()["message"]:
        time.sleep(0.01)
    job.request_stop("discard")
    assert actions.job_view(runner, "train")["status"] == \
        "**Stopping** (discarding the LoRA): step 3/10, loss 0.1000, 1.0 s/step, ETA 7 s"
    release.set()
    assert job.done.wait(10)
    view = actions.job_view(runner, "train")
    assert view["status"] == "**Stopped.** stopped at step 3/10 in 5 s; the LoRA was discarded"
    assert view["status_raw"]["eta_s"] is None and not view["running"]


@pytest.mark.parametrize("seconds, text", [(4.4, "4 s"), (89, "89 s"), (612, "10 min"), (3900, "1 h 5 min"),
                                           (7200, "2 h")])
def test_durations_read_as_people_say_them(seconds, text):
    assert status_text.duration(seconds) == text


def test_speed_is_seconds_per_step_when_slow_and_steps_per_second_when_fast():
    assert status_text.speed(1.3) == "1.3 s/step" and status_text.speed(0.25) == "4.0 steps/s"
    assert status_text.step_line(120, 600, 0.12345, 1.3) == "step 120/600, loss 0.1235, 1.3 s/step, ETA 10 min"


def test_previews_are_labelled_with_their_step():
    runner = JobRunner()
    job = runner.start("train", lambda job: JobResult(report={"previews": ["/x/step-000000.png",
                                                                           "/x/step-000050.png"]}))
    assert job.done.wait(10)
    assert actions.job_view(runner, "train")["previews"] == [("/x/step-000000.png", "step 0"),
                                                             ("/x/step-000050.png", "step 50")]


def test_a_failed_run_reads_in_words_and_points_at_the_apply_button():
    from lora_train.trainer import TrainingDivergedError

    runner = JobRunner()

    def work(job):
        raise TrainingDivergedError("the loss became nan at step 3 (images a.png); lower training.learning_rate",
                                    {"training.learning_rate": 5e-5})

    assert runner.start("train", work).done.wait(10)
    view = actions.job_view(runner, "train")
    assert view["status"] == ("**Failed:** the loss became nan at step 3 (images a.png); lower Learning rate "
                              "(training.learning_rate) Apply the suggested settings with the button below, then "
                              "start again.")
    assert view["status_raw"]["advice"] == {"training.learning_rate": 5e-5}
