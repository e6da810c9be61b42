"""The WebUI's train job (`tasks.train_job` run by `JobRunner`) on the stand-in WebUI: where the files land,
previews from the WebUI's sampler, the live model given back exactly, Interrupt and stop, and the checks made
before a job starts."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_train.config import ConfigError
from lora_train.jobs import JobRunner
from lora_train.webui import status_text
from lora_train.webui.a1111 import A1111Host
from lora_train.webui.tasks import PreviewOptions, prepare_train_config, train_job
from host_state import assert_same_model, snapshot
from webui_standin import ProbeHost, installed, train_values, wait_for_pause

NAME = "webui_lora"
JOB_TIMEOUT_S = 120
TASK_ID = "task(lora-train-jobs-test)"
PREVIEW = PreviewOptions(every_n_steps=2, steps=2, width=64, height=64)


@pytest.fixture
def webui(tiny_ldm, tmp_path):
    """The stand-in WebUI holding the tiny checkpoint; yields modules.shared."""
    with installed(tiny_ldm, tmp_path / "webui") as shared:
        yield shared


def run(work) -> dict:
    job = JobRunner().start("train", work)
    assert job.done.wait(JOB_TIMEOUT_S), "the job did not finish"
    return job.snapshot()


def run_paused(host: ProbeHost, work, at_pause) -> dict:
    """Runs the job until host pauses it, calls at_pause(job), resumes it and waits for the end."""
    job = JobRunner().start("train", work)
    try:
        wait_for_pause(host, job)
        at_pause(job)
    finally:
        host.resume.set()
    assert job.done.wait(JOB_TIMEOUT_S), "the job did not finish"
    return job.snapshot()


def lora_dir() -> Path:
    return A1111Host().lora_dir()


def work_dir() -> Path:
    return A1111Host().work_dir(NAME)


def lora_dir_files():
    return sorted(p.name for p in lora_dir().iterdir()) if lora_dir().is_dir() else []


def test_train_job_lands_the_lora_and_gives_the_model_back(webui, sample_images):
    import networks
    from modules import processing, progress

    host, lora, work = ProbeHost(), lora_dir(), work_dir()
    before = snapshot(webui.sd_model)
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    values = train_values(sample_images, NAME, steps=4, save_steps=2)

    status = run(train_job(values, host, PREVIEW, task_id=TASK_ID))

    assert status["state"] == "done", status["error"]
    assert status["output"] == str(lora / f"{NAME}.safetensors")
    assert status["step"] == status["total_steps"] == 4 and len(status["losses"]) == 4
    assert lora_dir_files() == [f"{NAME}.safetensors"], "only the LoRA goes to the Lora folder"
    report = status["report"]
    assert report["verification"]["unmatched"] == [] and report["verification"]["matched"] > 0
    assert NAME in networks.available_networks, "the Lora list was refreshed"

    assert report["log_dir"] == str(work / "logs") and any((work / "logs").iterdir())
    assert report["checkpoints"] == [str(work / "checkpoints" / f"{NAME}-step{s:06d}") for s in (2, 4)]
    previews = [work / "previews" / f"step-{s:06d}.png" for s in (0, 2, 4)]
    assert report["previews"] == [str(p) for p in previews]
    for path in previews:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64)
    assert webui.state.id_live_preview == 3 and webui.state.current_image.size == (64, 64)

    assert host.reports and all(r.lock_held and r.job == "lora_train" for r in host.reports)
    assert [r.step for r in host.reports if r.text.startswith("step")] == [1, 2, 3, 4]
    assert webui.state.job == "" and TASK_ID in progress.finished_tasks
    assert processing.StableDiffusionProcessing.cached_c == [None, None], "cached conditioning dropped"
    assert_same_model(webui.sd_model, before)
    assert torch.equal(torch.get_rng_state(), rng), "the WebUI's RNG state is untouched"


def test_the_file_records_the_clip_skip_the_webui_trained_with(webui, sample_images):
    webui.opts.CLIP_stop_at_last_layers = 2
    status = run(train_job(train_values(sample_images, NAME, steps=1), A1111Host()))
    assert status["state"] == "done", status["error"]
    with safe_open(status["output"], "pt") as file:
        assert file.metadata()["ss_clip_skip"] == "2"


def test_the_page_progress_bar_follows_the_job(webui, sample_images):
    from modules import progress

    host = ProbeHost(pause_at=1)
    work = train_job(train_values(sample_images, NAME, steps=4), host, task_id=TASK_ID)

    def check(job):
        answer = progress.progressapi(progress.ProgressRequest(id_task=TASK_ID))
        assert answer.active and answer.progress == pytest.approx(0.25)
        assert answer.textinfo.startswith("step 1/4")
        assert job.snapshot()["step"] == 1

    assert run_paused(host, work, check)["state"] == "done"


def test_interrupt_stops_the_job_and_saves_what_was_learned(webui, sample_images):
    host = ProbeHost(pause_at=1)
    webui.state.interrupted = True  # left over from an earlier generation: a new job starts afresh
    work = train_job(train_values(sample_images, NAME, steps=20), host)

    status = run_paused(host, work, lambda job: webui.state.interrupt())

    assert status["state"] == "stopped" and status["step"] == 1, status["error"]
    with safe_open(status["output"], "pt") as file:
        assert file.metadata()["ss_steps"] == "1"
    assert status["report"]["verification"]["unmatched"] == []


def test_stop_with_discard_writes_no_lora(webui, sample_images):
    host = ProbeHost(pause_at=1)
    work = train_job(train_values(sample_images, NAME, steps=20), host)

    status = run_paused(host, work, lambda job: job.request_stop("discard"))

    assert status["state"] == "stopped" and status["output"] is None, status["error"]
    assert status["report"]["discarded"] and "verification" not in status["report"]
    assert lora_dir_files() == []


def test_prepare_train_config_puts_work_files_outside_the_lora_folder(webui, sample_images, tmp_path):
    from modules import paths_internal

    lora, work = lora_dir(), work_dir()
    config = prepare_train_config(train_values(sample_images, NAME), ProbeHost())
    assert config.output.lora_path == lora / f"{NAME}.safetensors"
    assert lora not in work.parents and work.parent == Path(paths_internal.default_output_dir) / "lora-train"
    assert config.output.log_dir == work / "logs"
    assert config.output.checkpoints_dir == work / "checkpoints"
    mine = prepare_train_config(train_values(sample_images, NAME, logging_dir=str(tmp_path / "tb")), ProbeHost())
    assert mine.output.log_dir == tmp_path / "tb"


def test_prepare_train_config_refuses_a_base_model(webui, sample_images, tiny_checkpoint):
    values = train_values(sample_images, NAME)
    values["model"]["base_model"] = str(tiny_checkpoint)
    with pytest.raises(ConfigError, match="^model.base_model: the WebUI trains the checkpoint it has loaded"):
        prepare_train_config(values, ProbeHost())


def test_prepare_train_config_refuses_an_existing_lora_without_overwrite(webui, sample_images):
    existing = lora_dir() / f"{NAME}.safetensors"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"an earlier LoRA")
    with pytest.raises(ConfigError, match=r"^output\.output_name: .*already exists"):
        train_job(train_values(sample_images, NAME), ProbeHost())
    prepare_train_config(train_values(sample_images, NAME, overwrite=True), ProbeHost())
    assert existing.read_bytes() == b"an earlier LoRA"


def wait_for_message(job, start: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not job.snapshot()["message"].startswith(start):
        assert not job.done.is_set(), f"the job ended before saying {start!r}: {job.snapshot()}"
        assert time.monotonic() < deadline, f"the job never said {start!r}: {job.snapshot()['message']}"
        time.sleep(0.02)


ENDLESS_PREVIEW = PreviewOptions(every_n_steps=1, steps=1_000_000, width=64, height=64)  # hours, unless cut short


@pytest.mark.parametrize("mode", ["discard", "save"])
def test_stop_while_a_preview_is_generating_ends_the_job_within_a_step(webui, sample_images, mode):
    work = train_job(train_values(sample_images, NAME, steps=20), A1111Host(), ENDLESS_PREVIEW)
    job = JobRunner().start("train", work)
    wait_for_message(job, "generating preview at step 0")
    asked = time.monotonic()
    job.request_stop(mode)

    assert job.done.wait(20), "the preview was not interrupted"
    status = job.snapshot()
    assert status["state"] == "stopped" and status["step"] == 0, status["error"]
    assert time.monotonic() - asked < 20
    assert status["report"]["previews"] == [], "the half-made preview is not kept"
    assert (status["output"] is None) == (mode == "discard")
    assert lora_dir_files() == ([] if mode == "discard" else [f"{NAME}.safetensors"])
    assert webui.state.interrupted is False, "the WebUI's Interrupt flag is as it was before the preview"
    assert status["message"] == f"stopped at step 0/20 in {status_text.duration(status['report']['seconds'])}; " \
        f"the LoRA was {'discarded' if mode == 'discard' else 'saved'}"
    assert status["eta_s"] is None


def test_an_interrupt_pressed_during_a_preview_stops_the_job_and_stays_pressed(webui, sample_images):
    host = A1111Host()
    job = JobRunner().start("train", train_job(train_values(sample_images, NAME, steps=20), host, ENDLESS_PREVIEW))
    wait_for_message(job, "generating preview at step 0")
    webui.state.interrupt()  # the page's Interrupt: the sampler stops, the job saves
    assert job.done.wait(20), "the preview did not stop on Interrupt"
    status = job.snapshot()
    assert status["state"] == "stopped" and status["output"], status["error"]
    assert webui.state.interrupted is True


def test_the_status_says_what_the_run_does_now_and_nothing_stale_at_the_end(webui, sample_images):
    host = ProbeHost()
    values = train_values(sample_images, NAME, steps=4)
    values["training"]["cache_latents"] = True
    status = run(train_job(values, host, PREVIEW))
    texts = [report.text for report in host.reports]
    assert texts[0] == "caching latents 1/8" and "caching latents 8/8" in texts
    assert texts[texts.index("caching latents 8/8") + 1:][:2] == ["starting: 4 steps",
                                                                  "generating preview at step 0"]
    steps = [text for text in texts if text.startswith("step 1/4")]
    assert steps and re.fullmatch(r"step 1/4, loss \d\.\d{4}, \d+\.\d (s/step|steps/s), ETA \d+ (s|min)", steps[0])
    assert texts[-1] == "generating preview at step 4"
    assert status["state"] == "done" and status["eta_s"] is None
    assert re.fullmatch(r"4 steps in \d+ s \(\d+\.\d (s/step|steps/s)\)", status["message"]), status["message"]
