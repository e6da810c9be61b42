"""What the tests against a real, running WebUI share (A1111 in test_webui_real.py, Forge in test_forge_real.py):
an HTTP client that fails clearly when nothing answers, waiting for a job, an image's hash, the harness fingerprint."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Callable, Dict, Iterator

import pytest


def host_client(base: str, what: str, timeout_s: float) -> Iterator:
    """An httpx client for the WebUI at `base`; the test fails saying what to start when it does not answer."""
    httpx = pytest.importorskip("httpx")
    with httpx.Client(base_url=base, timeout=timeout_s) as session:
        try:
            session.get("/sdapi/v1/sd-models").raise_for_status()
        except httpx.HTTPError as error:
            pytest.fail(f"no {what} answering at {base} ({error}); start it with the extension installed")
        yield session


def wait_for_job(client, job_id: str, until: Callable[[Dict], bool] = lambda status: False,
                 timeout_s: float = 600) -> Dict:
    """The job's status once it has ended or `until(status)` holds; fails the test after timeout_s."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get(f"/lora-train/v1/jobs/{job_id}").json()
        if until(status) or status["state"] != "running":
            return status
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not get there in {timeout_s} s")


def image_hash(client, prompt: str, txt2img: Dict) -> str:
    """sha256 of the PNG the WebUI's txt2img API returns for the prompt."""
    response = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, **txt2img})
    response.raise_for_status()
    return hashlib.sha256(base64.b64decode(response.json()["images"][0])).hexdigest()


def fingerprint(client, required: bool) -> Dict:
    """The harness test extension's sha256 of the model state, grads, modes and hooks; {} when it is not installed
    and not required."""
    response = client.get("/harness/fingerprint")
    if required or response.status_code == 200:
        response.raise_for_status()
        return response.json()
    return {}
