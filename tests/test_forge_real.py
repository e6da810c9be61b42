"""Against a real, running Stable Diffusion WebUI Forge with this extension installed (the Forge harness, see
README "Forge"): caption, train SD1.5's UNet and text encoder in the loaded model, and check that the LoRA lands in
models/Lora, that Forge's own loader applies every key of it, that it changes txt2img, that the model comes back
bit for bit, that a second job is refused, and that Stop & discard writes nothing.

Skipped unless FORGE_WEBUI_DIR names the Forge folder (the harness's `$FORGE_ROOT/webui`); the server must listen
on 127.0.0.1:$FORGE_PORT (7870) and log to $FORGE_LOG (default: `$FORGE_ROOT/logs/server-api.log`).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest

import real_host
from real_host import host_client, wait_for_job

WEBUI = os.environ.get("FORGE_WEBUI_DIR")
pytestmark = pytest.mark.skipif(not WEBUI, reason="FORGE_WEBUI_DIR is not set: no real Forge to test against")
BASE = f"http://127.0.0.1:{os.environ.get('FORGE_PORT', '7870')}"
NAME = "lora_train_forge_test"
TXT2IMG = {"steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler", "cfg_scale": 5}
wait = functools.partial(wait_for_job, timeout_s=900)
image_hash = functools.partial(real_host.image_hash, txt2img=TXT2IMG)
fingerprint = functools.partial(real_host.fingerprint, required=True)
SD15_KEYS = {"UNet": 192, "CLIP": 72}  # kohya modules of SD1.5: attention blocks, CLIP q/k/v/out and MLP


def _log() -> Path:
    return Path(os.environ.get("FORGE_LOG") or Path(WEBUI).parent / "logs" / "server-api.log")


@pytest.fixture(scope="module")
def client():
    yield from host_client(BASE, "Forge", timeout_s=600)








def lora_lines(since: int, path: Path) -> list:
    """What Forge's LoRA loader printed about `path` after byte offset `since` of the server log."""
    with open(_log(), "rb") as log:
        log.seek(since)
        text = log.read().decode("utf-8", "replace")
    return [line for line in text.splitlines() if line.startswith("[LORA]") and str(path) in line]


def config(images: Path, name: str, steps: int) -> dict:
    return {"data": {"train_data_dir": str(images), "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64},
            "model": {"lora_rank": 4, "alpha": 4, "train_text_encoder": True},
            "training": {"batch_size": 2, "max_train_steps": steps, "learning_rate": 1e-3},
            "output": {"output_name": name, "overwrite": True}}


@pytest.fixture(scope="module")
def captioned(client, tmp_path_factory) -> Path:
    from lora_train.bench_caption import build_tiny_blip
    from lora_train.cli_demo import make_sample_dataset

    folder = tmp_path_factory.mktemp("forge-real")
    images = make_sample_dataset(folder / "images", captions=False)
    started = client.post("/lora-train/v1/caption", json={"input": str(images), "model": str(build_tiny_blip(
        folder / "tiny-blip")), "prefix": "sks style, ", "batch_size": 4, "max_length": 12, "min_length": 4})
    assert started.status_code == 200, started.text
    done = wait(client, started.json()["job_id"])
    assert done["state"] == "done" and done["report"]["captioned"] == 8, done
    assert all(p.read_text().startswith("sks style, ") for p in images.glob("*.txt"))
    return images


def test_train_unet_and_text_encoder_then_use_the_lora(client, captioned):
    before_image = image_hash(client, "a red circle")  # a first generation settles Forge's one-time casts
    before_model = fingerprint(client)
    lora = Path(WEBUI) / "models" / "Lora" / f"{NAME}.safetensors"
    started = client.post("/lora-train/v1/train", json={"config": config(captioned, NAME, 6),
                                                        "preview": {"every_n_steps": 3, "steps": 2}})
    assert started.status_code == 200, started.text
    busy = client.post("/lora-train/v1/train", json={"config": config(captioned, NAME + "_2", 2)})
    assert busy.status_code == 409, busy.text
    running = wait(client, started.json()["job_id"], until=lambda status: status.get("step", 0) >= 1)
    progress = client.get("/sdapi/v1/progress").json()["state"]
    assert running["state"] == "running" and progress["job"] == "lora_train", (running, progress)
    trained = wait(client, started.json()["job_id"])
    assert trained["state"] == "done", trained
    verification = trained["report"]["verification"]
    print(f"\ntrained {trained['step']} steps in {trained['report']['seconds']} s; verification {verification}")
    assert Path(trained["output"]).resolve() == lora.resolve() and lora.is_file()
    assert verification["unmatched"] == [] and verification["matched"] == verification["stems"] == 264
    assert [Path(p).name for p in trained["report"]["previews"]] == [
        "step-000000.png", "step-000003.png", "step-000006.png"]

    assert image_hash(client, "a red circle") == before_image, "no-LoRA txt2img is bit-identical after training"
    assert fingerprint(client) == before_model
    since = _log().stat().st_size
    assert image_hash(client, f"a red circle <lora:{NAME}:1>") != before_image, "the LoRA changes the image"
    lines = lora_lines(since, lora)
    print("\n".join(lines))
    for part, keys in SD15_KEYS.items():
        assert any(re.search(rf"for KModel-{part} with {keys} keys .*\(skipped 0 keys\)", line) for line in lines)
    assert not [line for line in lines if "unmatched" in line or "mismatch" in line.lower()], lines
    assert image_hash(client, "a red circle") == before_image, "Forge unmerges the LoRA for a plain prompt"
    assert fingerprint(client) == before_model
    assert NAME in [item["name"] for item in client.get("/sdapi/v1/loras").json()]


def test_stop_and_discard_writes_nothing(client, captioned):
    before_model = fingerprint(client)
    name = f"{NAME}_discarded"
    lora = Path(WEBUI) / "models" / "Lora" / f"{name}.safetensors"
    lora.unlink(missing_ok=True)
    started = client.post("/lora-train/v1/train", json={"config": config(captioned, name, 500)})
    assert started.status_code == 200, started.text
    job_id = started.json()["job_id"]
    wait(client, job_id, until=lambda status: status.get("step", 0) >= 1)
    client.post(f"/lora-train/v1/jobs/{job_id}/stop", json={"mode": "discard"}).raise_for_status()
    stopped = wait(client, job_id)
    assert stopped["state"] == "stopped" and stopped["output"] is None, stopped
    assert not lora.exists() and not list(lora.parent.glob(f"{name}*"))
    assert fingerprint(client) == before_model
