"""Against a real, running AUTOMATIC1111 WebUI with this extension installed (see README, "Testing in a real
WebUI"): caption through the API with a local tiny BLIP, tag with a tiny WD14 tagger, train the loaded
checkpoint, and check the LoRA lands in models/Lora, is listed, changes txt2img, matches every layer, and leaves
the host model as it was. With an SDXL checkpoint loaded (the harness's tiny-sdxl), the SDXL case trains the UNet
and both text encoders instead.

Skipped unless SD_WEBUI_DIR names the WebUI folder; the server must listen on 127.0.0.1:$A1111_PORT (7860). The
Lora loader's "didn't match keys" lines are looked for in $A1111_LOG (default: the harness's API-mode log).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

import real_host
from real_host import host_client, wait_for_job

WEBUI = os.environ.get("SD_WEBUI_DIR")
pytestmark = pytest.mark.skipif(not WEBUI, reason="SD_WEBUI_DIR is not set: no real WebUI to test against")
BASE = f"http://127.0.0.1:{os.environ.get('A1111_PORT', '7860')}"
NAME = "lora_train_real_test"
TXT2IMG = {"steps": 3, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler", "cfg_scale": 5}
wait = functools.partial(wait_for_job, timeout_s=600)
image_hash = functools.partial(real_host.image_hash, txt2img=TXT2IMG)
fingerprint = functools.partial(real_host.fingerprint, required=False)
LOG = Path(os.environ.get("A1111_LOG") or Path(WEBUI or ".").parent / "logs" / "server-api.log")


@pytest.fixture(scope="module")
def client():
    yield from host_client(BASE, "WebUI", timeout_s=300)


@pytest.fixture(scope="module", autouse=True)
def lora_files_removed(client):
    """The LoRA files these tests write into models/Lora are removed afterwards, and the Lora list refreshed."""
    yield
    for path in (Path(WEBUI) / "models" / "Lora").glob(f"{NAME}*.safetensors"):
        path.unlink()
    client.post("/sdapi/v1/refresh-loras")


@pytest.fixture(scope="module")
def sdxl(client) -> bool:
    """Whether the WebUI holds an SDXL checkpoint (the harness test extension's state, else the model list)."""
    state = client.get("/harness/state")
    if state.status_code == 200:
        return state.json().get("is_sdxl") == "True"
    options = client.get("/sdapi/v1/options").json()
    return "xl" in str(options.get("sd_model_checkpoint", "")).lower()


@pytest.fixture
def sd1(sdxl):
    if sdxl:
        pytest.skip("an SD1 case: the WebUI holds an SDXL checkpoint")








@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from lora_train.cli_demo import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("real") / "images", captions=False)


def test_caption_then_train_then_use_the_lora(client, sd1, dataset, tmp_path):
    from lora_train.bench_caption import build_tiny_blip

    blip = build_tiny_blip(tmp_path / "tiny-blip")
    started = client.post("/lora-train/v1/caption", json={"input": str(dataset), "model": str(blip),
                                                          "prefix": "sks style, ", "batch_size": 4,
                                                          "max_length": 12, "min_length": 4})
    assert started.status_code == 200, started.text
    captioned = wait(client, started.json()["job_id"])
    assert captioned["state"] == "done" and captioned["report"]["captioned"] == 8, captioned
    assert all(p.read_text().startswith("sks style, ") for p in dataset.glob("*.txt"))

    before_image, before_model = image_hash(client, "a red circle"), fingerprint(client)
    config = {"data": {"train_data_dir": str(dataset), "resolution": 64, "min_bucket_reso": 64,
                       "max_bucket_reso": 128},
              # UNet only: the harness's tiny text encoder gives NaN for some prompts in the WebUI itself
              "model": {"lora_rank": 8, "alpha": 8, "train_text_encoder": False},
              "training": {"batch_size": 2, "max_train_steps": 12, "learning_rate": 1e-3},
              "output": {"output_name": NAME, "overwrite": True}}
    # previews need the VAE and text encoder, which a UNet-only run with cached outputs takes off the device
    preview = {"every_n_steps": 6, "steps": 2}
    started = client.post("/lora-train/v1/train", json={"config": config, "preview": preview})
    assert started.status_code == 200, started.text
    busy = client.post("/lora-train/v1/train", json={"config": config})
    trained = wait(client, started.json()["job_id"])
    assert busy.status_code == 409
    assert trained["state"] == "done", trained
    verification = trained["report"]["verification"]
    print(f"\ntrained {trained['step']} steps in {trained['report']['seconds']} s; "
          f"verification {verification}; losses {[round(x, 4) for x in trained['losses']]}")
    lora = Path(WEBUI) / "models" / "Lora" / f"{NAME}.safetensors"
    assert Path(trained["output"]).resolve() == lora.resolve() and lora.is_file()
    assert verification["unmatched"] == [] and verification["matched"] == verification["stems"] > 0
    assert [Path(p).name for p in trained["report"]["previews"]] == [
        "step-000000.png", "step-000006.png", "step-000012.png"]

    assert NAME in [item["name"] for item in client.get("/sdapi/v1/loras").json()]
    assert image_hash(client, "a red circle") == before_image, "no-LoRA txt2img is bit-identical after training"
    assert fingerprint(client) == before_model or not before_model
    assert image_hash(client, f"a red circle <lora:{NAME}:1>") != before_image, "the LoRA changes the image"


def test_tag_a_folder_with_a_wd14_tagger_from_the_api(client, tmp_path):
    from lora_train.cli_demo import make_sample_dataset
    from lora_train.tiny_tagger import build_tiny_tagger

    images = make_sample_dataset(tmp_path / "to-tag", captions=False)
    (images / "00_red_circle.txt").write_text("hand written", encoding="utf-8")
    body = {"input": str(images), "model": str(build_tiny_tagger(tmp_path / "tiny-tagger")), "prefix": "sks, ",
            "batch_size": 4, "exclude_tags": ["solo"]}
    started = client.post("/lora-train/v1/caption", json=body)
    if started.status_code == 422 and "onnxruntime" in started.text:
        pytest.skip(f"the WebUI's venv has no onnxruntime: {started.json()['detail']}")
    assert started.status_code == 200, started.text
    tagged = wait(client, started.json()["job_id"])
    assert tagged["state"] == "done" and (tagged["report"]["captioned"], tagged["report"]["skipped"]) == (7, 1)
    tags = {path.stem: path.read_text(encoding="utf-8") for path in images.glob("*.txt")}
    assert tags.pop("00_red_circle") == "hand written"
    assert all(text.startswith("sks, 1girl") and "solo" not in text for text in tags.values()), tags


def test_bad_requests_get_clear_errors(client):
    unknown = client.post("/lora-train/v1/train", json={"config": {"training": {"learning_rat": 1}}})
    assert unknown.status_code == 422 and "did you mean training.learning_rate" in unknown.text
    escape = client.post("/lora-train/v1/train", json={"config": {"output": {"output_name": "../../x"}}})
    assert escape.status_code == 422 and "output.output_name" in escape.text
    assert client.get("/lora-train/v1/jobs/nope").status_code == 404


def test_text_encoder_adapters_load_in_the_webui_too(client, sd1, tmp_path):
    from lora_train.cli_demo import make_sample_dataset

    images = make_sample_dataset(tmp_path / "captioned")
    config = {"data": {"train_data_dir": str(images), "resolution": 64, "min_bucket_reso": 64,
                       "max_bucket_reso": 128},
              "model": {"lora_rank": 4, "alpha": 4, "train_text_encoder": True},
              "training": {"batch_size": 2, "max_train_steps": 4, "learning_rate": 1e-3},
              "output": {"output_name": f"{NAME}_te", "overwrite": True}}
    started = client.post("/lora-train/v1/train", json={"config": config})
    assert started.status_code == 200, started.text
    trained = wait(client, started.json()["job_id"])
    assert trained["state"] == "done", trained
    verification = trained["report"]["verification"]
    print(f"\nUNet + text encoder: verification {verification}")
    assert verification["unmatched"] == [] and verification["matched"] == verification["stems"]
    assert any(stem for stem in range(verification["stems"])) and verification["stems"] > 192


def unmatched_lines(name: str) -> list:
    """The Lora loader's DEBUG lines about keys of the file `name` it did not match."""
    lines = LOG.read_text(errors="replace").splitlines()
    assert any(" DEBUG [" in line for line in lines), f"{LOG} has no DEBUG lines: start with SD_WEBUI_LOG_LEVEL=DEBUG"
    return [line for line in lines if "didn't match keys" in line and f"{name}.safetensors" in line]


def test_sdxl_unet_and_both_text_encoders_train_and_load(client, sdxl, tmp_path):
    from lora_train.cli_demo import make_sample_dataset
    from safetensors import safe_open

    if not sdxl:
        pytest.skip("an SDXL case: start the WebUI with the tiny-sdxl checkpoint")
    name = f"{NAME}_sdxl"
    before_image, before_model = image_hash(client, "a red circle"), fingerprint(client)
    config = {"data": {"train_data_dir": str(make_sample_dataset(tmp_path / "images")), "resolution": 64,
                       "min_bucket_reso": 64, "max_bucket_reso": 128},
              "model": {"lora_rank": 4, "alpha": 4, "train_text_encoder": True},
              "training": {"batch_size": 2, "max_train_steps": 6, "learning_rate": 1e-3},
              "output": {"output_name": name, "overwrite": True}}
    started = client.post("/lora-train/v1/train", json={"config": config})
    assert started.status_code == 200, started.text
    trained = wait(client, started.json()["job_id"])
    assert trained["state"] == "done", trained
    verification = trained["report"]["verification"]
    with safe_open(trained["output"], "pt") as file:
        metadata, stems = file.metadata(), {key.split(".")[0] for key in file.keys()}
    parts = {part: sum(stem.startswith(f"lora_{part}_") for stem in stems) for part in ("unet", "te1", "te2")}
    print(f"\nSDXL UNet + text encoders: {trained['step']} steps in {trained['report']['seconds']} s; "
          f"verification {verification}; stems {parts}")
    assert verification["unmatched"] == [] and verification["matched"] == verification["stems"] == len(stems)
    assert parts["unet"] > 0 and parts["te1"] > 0 and parts["te2"] > 0
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"

    assert image_hash(client, "a red circle") == before_image, "no-LoRA txt2img is bit-identical after training"
    assert fingerprint(client) == before_model and before_model, "the harness fingerprint is unchanged"
    assert image_hash(client, f"a red circle <lora:{name}:1>") != before_image, "the LoRA changes the image"
    assert unmatched_lines(name) == [], "the WebUI's loader placed every key"
