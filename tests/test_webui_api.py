"""The HTTP API (/lora-train/v1) on a bare FastAPI app with the stand-in WebUI: basic auth as --api-auth sets
it, train, caption and tagger jobs to the end, 409 while a job runs, 422 naming the field, 404, and what
scripts/lora_train_tab.py registers with the WebUI."""

from __future__ import annotations

import runpy
import threading
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import lora_train
from lora_train.bench_caption import build_tiny_blip
from lora_train.captioning import DEFAULT_MODEL
from lora_train.cli_demo import make_sample_dataset
from lora_train.jobs import JobResult, JobRunner
from lora_train.tiny_tagger import build_tiny_tagger
from lora_train.webui import api
from lora_train.webui.a1111 import A1111Host
from webui_standin import REPO, ProbeHost, installed, queue_lock_held, train_values, wait_for_pause

PREFIX = api.PREFIX
NAME = "api_lora"
JOB_TIMEOUT_S = 120
USERS = "alice:secret,bob:pass:with:colons"


@pytest.fixture
def webui(tiny_ldm, tmp_path):
    """The stand-in WebUI holding the tiny checkpoint; yields modules.shared."""
    with installed(tiny_ldm, tmp_path / "webui") as shared:
        yield shared


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("blip"))


def client_for(runner: JobRunner, host: A1111Host, api_auth=None) -> TestClient:
    app = FastAPI()
    api.register(app, runner, host, api_auth=api_auth)
    return TestClient(app)


def wait_done(runner: JobRunner, job_id: str) -> None:
    assert runner.get(job_id).done.wait(JOB_TIMEOUT_S), "the job did not finish"


def detail(response) -> str:
    """The 422's message, or the dotted field path(s) of pydantic's errors ("config.training: ...")."""
    body = response.json()["detail"]
    if isinstance(body, str):
        return body
    return "; ".join(".".join(str(part) for part in error["loc"][1:]) + ": " + error["msg"] for error in body)


def test_without_api_auth_the_routes_are_open(webui):
    client = client_for(JobRunner(), A1111Host())
    response = client.get(f"{PREFIX}/jobs/nope")
    assert response.status_code == 404 and response.json()["detail"] == "no job nope"
    assert client.post(f"{PREFIX}/jobs/nope/stop", json={"mode": "save"}).status_code == 404


@pytest.mark.parametrize("credentials, status", [
    (None, 401),
    (("alice", "wrong"), 401),
    (("mallory", "secret"), 401),
    (("alice", "secret"), 404),
    (("bob", "pass:with:colons"), 404),
])
def test_with_api_auth_only_listed_users_get_through(webui, credentials, status):
    client = client_for(JobRunner(), A1111Host(), api_auth=USERS)
    response = client.get(f"{PREFIX}/jobs/nope", auth=credentials)
    assert response.status_code == status
    if status == 401:
        assert client.post(f"{PREFIX}/train", json={"config": []}, auth=credentials).status_code == 401, \
            "refused before the body is read"


def test_train_through_the_api_while_a_second_job_gets_409(webui, sample_images, tiny_blip):
    runner, host = JobRunner(), ProbeHost(pause_at=1)
    client = client_for(runner, host)
    values = train_values(sample_images, NAME, steps=2)
    started = client.post(f"{PREFIX}/train", json={"config": values})
    assert started.status_code == 200, started.text
    job_id = started.json()["job_id"]
    try:
        wait_for_pause(host, runner.get(job_id))
        running = client.get(f"{PREFIX}/jobs/{job_id}").json()
        assert running["state"] == "running" and running["step"] == 1 and queue_lock_held()
        for name in ("other", NAME):  # the same name too: the job that runs holds its lock, but busy is the answer
            second = client.post(f"{PREFIX}/train", json={"config": train_values(sample_images, name)})
            assert second.status_code == 409, second.text
            assert second.json()["detail"] == f"a train job ({job_id}) is running; stop it or wait for it to finish"
        caption = client.post(f"{PREFIX}/caption", json={"input": str(sample_images), "model": str(tiny_blip)})
        assert caption.status_code == 409
    finally:
        host.resume.set()
    wait_done(runner, job_id)

    status = client.get(f"{PREFIX}/jobs/{job_id}").json()
    assert status["state"] == "done", status["error"]
    assert status["output"] == str(A1111Host().lora_dir() / f"{NAME}.safetensors") and Path(status["output"]).is_file()
    assert status["report"]["verification"]["unmatched"] == []
    ended = client.post(f"{PREFIX}/jobs/{job_id}/stop", json={"mode": "save"})
    assert ended.status_code == 409 and "has already ended (done)" in ended.json()["detail"]
    assert client.post(f"{PREFIX}/train", json={"config": values}).status_code == 422, "the LoRA exists now"


def test_stop_through_the_api(webui, sample_images):
    runner, host = JobRunner(), ProbeHost(pause_at=1)
    client = client_for(runner, host)
    started = client.post(f"{PREFIX}/train", json={"config": train_values(sample_images, NAME, steps=20)})
    job_id = started.json()["job_id"]
    try:
        wait_for_pause(host, runner.get(job_id))
        stopping = client.post(f"{PREFIX}/jobs/{job_id}/stop", json={"mode": "discard"})
        assert stopping.status_code == 200 and stopping.json()["state"] == "running"
    finally:
        host.resume.set()
    wait_done(runner, job_id)
    status = client.get(f"{PREFIX}/jobs/{job_id}").json()
    assert status["state"] == "stopped" and status["output"] is None and status["step"] == 1


@pytest.mark.parametrize("route, body, expected", [
    ("train", {}, "config: field required"),
    ("train", {"config": "data: {}"}, "config: value is not a valid dict"),
    ("train", {"config": {"training": 5}}, "config.training: value is not a valid dict"),
    ("train", {"config": {}, "preview": {"steps": "many"}}, "preview.steps: value is not a valid integer"),
    ("train", {"config": {}, "preview": {"width": 32}}, "preview.width: ensure this value is greater than"),
    ("train", {"config": {"training": {"learning_rat": 1}}},
     "training.learning_rat: unknown key; did you mean training.learning_rate?"),
    ("train", {"config": {"trainig": {}}}, "trainig: unknown section; did you mean 'training'?"),
    ("train", {"config": {"training": {"learning_rate": "fast"}}}, "training.learning_rate: 'fast' is not valid"),
    ("train", {"config": {"output": {"output_name": "../../escape"}}}, "output.output_name: '../../escape'"),
    ("train", {"config": {"model": {"base_model": "x.safetensors"}}}, "model.base_model: the WebUI trains"),
    ("train", {"config": {"data": {"resolution": 512}}}, "data.train_data_dir"),
    ("caption", {"input": "/no/such/folder"}, "input: '/no/such/folder' is not a folder"),
    ("caption", {"input": ".", "batch_size": 0}, "batch_size: ensure this value is greater than or equal to 1"),
    ("caption", {"input": ".", "mode": "replace"}, "mode: unexpected value; permitted: 'skip'"),
    ("jobs/nope/stop", {"mode": "pause"}, "mode: unexpected value; permitted: 'save', 'discard'"),
    ("train", {"config": {}, "previews": {"every_n_steps": 1}}, "previews: extra fields not permitted"),
    ("caption", {"input": ".", "batchsize": 4}, "batchsize: extra fields not permitted"),
    ("caption", {"input": ".", "model": "nobody/nothing"}, "caption model 'nobody/nothing' cannot be loaded"),
])
def test_bad_requests_get_422_naming_the_field(webui, route, body, expected):
    runner = JobRunner()
    response = client_for(runner, A1111Host()).post(f"{PREFIX}/{route}", json=body)
    assert response.status_code == 422 and expected in detail(response), response.text
    assert runner.current() is None and not list(A1111Host().lora_dir().parent.glob("Lora/*"))


def test_stop_without_a_body_stops_and_saves(webui, sample_images):
    runner, host = JobRunner(), ProbeHost(pause_at=1)
    client = client_for(runner, host)
    job_id = client.post(f"{PREFIX}/train", json={"config": train_values(sample_images, NAME, steps=20)}
                         ).json()["job_id"]
    try:
        wait_for_pause(host, runner.get(job_id))
        assert client.post(f"{PREFIX}/jobs/{job_id}/stop").status_code == 200
    finally:
        host.resume.set()
    wait_done(runner, job_id)
    status = client.get(f"{PREFIX}/jobs/{job_id}").json()
    assert status["state"] == "stopped" and Path(status["output"]).is_file()


def test_malformed_json_gets_422(webui):
    response = client_for(JobRunner(), A1111Host()).post(
        f"{PREFIX}/train", content=b"{config: ", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "value_error.jsondecode"


def test_a_webui_that_cannot_train_gets_422_with_the_reason(tiny_ldm, tmp_path, sample_images):
    with installed(tiny_ldm, tmp_path, ["--lowvram"]):
        response = client_for(JobRunner(), A1111Host()).post(
            f"{PREFIX}/train", json={"config": train_values(sample_images, NAME)})
    assert response.status_code == 422 and "--lowvram" in detail(response)


def test_caption_job_captions_a_folder_under_the_queue_lock(webui, tiny_blip, tmp_path):
    images = make_sample_dataset(tmp_path / "images", captions=False)
    runner, host = JobRunner(), ProbeHost()
    client = client_for(runner, host)
    body = {"input": str(images), "model": str(tiny_blip), "prefix": "sks style, ", "batch_size": 4,
            "max_length": 8, "min_length": 2, "num_beams": 1}
    started = client.post(f"{PREFIX}/caption", json=body)
    assert started.status_code == 200, started.text
    wait_done(runner, started.json()["job_id"])

    status = client.get(f"{PREFIX}/jobs/{started.json()['job_id']}").json()
    assert status["state"] == "done" and status["report"]["captioned"] == 8, status
    captions = sorted(images.glob("*.txt"))
    assert len(captions) == 8 and all(p.read_text(encoding="utf-8").startswith("sks style, ") for p in captions)
    assert host.reports and all(r.lock_held and r.job == "lora_train_caption" for r in host.reports)
    assert host.reports[-1].step == 8 and not queue_lock_held() and webui.state.job == ""


def test_caption_job_tags_a_folder_with_a_wd14_tagger(webui, tmp_path):
    pytest.importorskip("onnxruntime", reason="the tagger needs onnxruntime (requirements/test.txt)")
    images = make_sample_dataset(tmp_path / "images", captions=False)
    (images / "00_red_circle.txt").write_text("hand written, 1girl", encoding="utf-8")
    (images / "broken.png").write_bytes(b"not a png")
    runner, host = JobRunner(), ProbeHost()
    client = client_for(runner, host)
    body = {"input": str(images), "model": str(build_tiny_tagger(tmp_path / "tagger")), "prefix": "sks, ",
            "batch_size": 3, "general_threshold": 0.5, "exclude_tags": ["solo"], "rating_tags": True}
    started = client.post(f"{PREFIX}/caption", json=body)
    assert started.status_code == 200, started.text
    wait_done(runner, started.json()["job_id"])

    status = client.get(f"{PREFIX}/jobs/{started.json()['job_id']}").json()
    assert status["state"] == "done", status
    assert (status["report"]["captioned"], status["report"]["skipped"]) == (7, 1)
    assert [Path(path).name for path, _ in status["report"]["failed"]] == ["broken.png"]
    tags = {path.stem: path.read_text(encoding="utf-8") for path in images.glob("*.txt")}
    assert tags.pop("00_red_circle") == "hand written, 1girl", "skip keeps what the user wrote"
    assert len(tags) == 7 and all(text.startswith("sks, general, ") and "solo" not in text for text in tags.values())
    assert all(r.lock_held and r.job == "lora_train_caption" for r in host.reports)


def test_a_tagger_without_onnxruntime_gets_422_with_the_pip_command_and_is_noted_for_install(
        webui, tmp_path, monkeypatch):
    from lora_train import extras
    from lora_train.webui import tasks

    monkeypatch.setattr(extras, "EXTENSION_DIR", tmp_path)
    real_find_spec = tasks.importlib.util.find_spec
    monkeypatch.setattr(tasks.importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args))
    response = client_for(JobRunner(), A1111Host()).post(
        f"{PREFIX}/caption", json={"input": str(tmp_path), "model": "SmilingWolf/wd-vit-tagger-v3"})
    assert response.status_code == 422 and "pip install onnxruntime==" in detail(response)
    assert "restart the WebUI" in detail(response) and extras.read_requests(tmp_path) == ["tagger"]


def test_the_captioning_tab_suggests_blip_for_an_sd1_checkpoint(webui):
    from lora_train.webui import ui

    tab = ui.build(JobRunner(), A1111Host())
    section = next(key for key, block in tab.blocks.items() if getattr(block, "label", None) == "Captioning")
    index = next(i for i, dependency in enumerate(tab.dependencies)
                 if dependency["trigger"] == "select" and section in dependency["targets"])
    text, model = tab.fns[index].fn()
    assert model == DEFAULT_MODEL and "SD1 checkpoints are prompted in sentences" in text


def test_clicking_a_tag_in_the_tab_shows_its_images(webui, tmp_path):
    import gradio as gr
    from gradio import helpers

    from lora_train.webui import actions, ui

    tab = ui.build(JobRunner(), A1111Host())
    table = next(key for key, block in tab.blocks.items() if getattr(block, "elem_id", None) == "lora_train_tag_table")
    index = next(i for i, dependency in enumerate(tab.dependencies)
                 if dependency["trigger"] == "select" and table in dependency["targets"])
    images = make_sample_dataset(tmp_path / "images")
    _, rows, _ = actions.scan_folder(str(images))
    tags = actions.tag_table(rows)
    red = next(row for row, (tag, _) in enumerate(tags) if tag == "a red circle")
    event = gr.SelectData(None, {"index": [red, 1], "value": 1, "selected": True})
    inputs = helpers.special_args(tab.fns[index].fn, [str(images), rows, tags], event_data=event)[0]
    tag, gallery = tab.fns[index].fn(*inputs)
    assert tag == "a red circle" and [Path(path).name for path, _ in gallery] == ["00_red_circle.png"]


def test_the_extension_registers_its_tab_settings_and_routes(tiny_ldm, tmp_path):
    from lora_train.webui import callbacks

    with installed(tiny_ldm, tmp_path, ["--api-auth", USERS]) as shared:
        from modules import script_callbacks

        runpy.run_path(str(REPO / "scripts" / "lora_train_tab.py"))
        assert {name: len(entries) for name, entries in script_callbacks.callback_map.items()} == {
            "callbacks_app_started": 1, "callbacks_model_loaded": 0, "callbacks_ui_tabs": 1,
            "callbacks_ui_settings": 1, "callbacks_script_unloaded": 1}

        app = FastAPI()
        script_callbacks.app_started_callback(None, app)
        client = TestClient(app)
        assert client.get(f"{PREFIX}/jobs/nope").status_code == 401, "--api-auth applies to the routes"
        assert client.get(f"{PREFIX}/jobs/nope", auth=("alice", "secret")).status_code == 404

        script_callbacks.ui_settings_callback()
        info = shared.opts.data_labels["lora_train_preview_every"]
        assert shared.opts.lora_train_preview_every == 0
        assert info.section == callbacks.SECTION and info.category_id == "training"

        from modules import infotext_utils

        [(tab, title, elem_id)] = script_callbacks.ui_tabs_callback()
        assert (type(tab).__name__, title, elem_id) == ("Blocks", "LoRA Train", "lora_train")
        version = [block for block in tab.blocks.values() if getattr(block, "elem_id", None) == "lora_train_version"]
        assert [block.value for block in version] == [f"sd-webui-lora-train {lora_train.__version__}"]
        assert [b.tabname for b in infotext_utils.registered_param_bindings] == ["txt2img"]

        release = threading.Event()
        job = callbacks.RUNNER.start("train", lambda job: JobResult() if release.wait(JOB_TIMEOUT_S) else None)
        try:
            script_callbacks.script_unloaded_callback()
            assert job.stop_mode == "save", "a running job is asked to stop and save"
        finally:
            release.set()
        assert job.done.wait(JOB_TIMEOUT_S)


def test_the_tab_fills_the_advice_of_a_failed_run_into_the_settings(webui):
    from lora_train.preflight import MemoryPreflightError
    from lora_train.webui import ui

    runner = JobRunner()
    advice = {"training.batch_size": 2, "training.gradient_checkpointing": True}
    job = runner.start("train", lambda job: (_ for _ in ()).throw(MemoryPreflightError("does not fit", advice)))
    assert job.done.wait(JOB_TIMEOUT_S)
    tab = ui.build(runner, A1111Host())
    button = next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == "lora_train_apply_advice")
    index = next(i for i, dependency in enumerate(tab.dependencies) if button._id in dependency["targets"])
    outputs = dict(zip(tab.dependencies[index]["outputs"], tab.fns[index].fn()))
    labelled = {tab.blocks[block].label: update.get("value") for block, update in outputs.items()
                if isinstance(update, dict) and "value" in update}
    assert labelled == {"Batch size": 2, "Gradient checkpointing": True}  # the form labels its fields so
    assert "Applied training.batch_size: 2, training.gradient_checkpointing: True" in outputs[
        next(b for b, block in tab.blocks.items() if getattr(block, "elem_id", None) == "lora_train_status")]
    assert outputs[button._id] == {"visible": False, "__type__": "generic_update"}


@pytest.mark.parametrize("change, expected", [
    ({"data": {"train_data_dir": "EMPTY"}}, "data.train_data_dir: no images in"),
    ({"data": {"min_bucket_reso": 256, "max_bucket_reso": 256}},
     "data.min_bucket_reso: resolution 64 is below the smallest bucket size (256)"),
    ({"output": {"output_name": "n" * 300}}, "output.output_name: 300 characters are too long"),
    ({"output": {"output_name": "LOCKED"}}, "output.output_name: 'LOCKED' in "),
])
def test_the_whole_plan_is_checked_before_a_train_job_is_accepted(webui, sample_images, tmp_path, change, expected):
    from lora_train import run_lock

    values = train_values(sample_images, NAME)
    (tmp_path / "empty").mkdir()
    for section, keys in change.items():
        values[section].update({key: str(tmp_path / "empty") if value == "EMPTY" else value
                                for key, value in keys.items()})
    runner, lora_dir = JobRunner(), A1111Host().lora_dir()
    lora_dir.mkdir(parents=True, exist_ok=True)
    with run_lock.held(lora_dir, "LOCKED", run_id="77"):
        response = client_for(runner, A1111Host()).post(f"{PREFIX}/train", json={"config": values})
    assert response.status_code == 422 and expected in detail(response), response.text
    assert runner.latest() is None, "no job was created"
