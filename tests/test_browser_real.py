"""The tab in a real AUTOMATIC1111 WebUI, in a browser, as a first-time user meets it: load a folder, caption it,
edit one caption, train, stop and discard a second run within a step, reload the page mid-run and find the
settings and the status back, test the LoRA and send it to txt2img. Screenshots go to $LORA_TRAIN_SHOTS.

Skipped unless LORA_TRAIN_BROWSER_URL names a WebUI started in UI mode with this extension (the harness:
`start_server.sh ui`) and SD_WEBUI_DIR its folder. Playwright for Python drives the machine's Chromium
($CHROMIUM, default /usr/bin/chromium). The LoRA files it writes into models/Lora are removed afterwards, and
the tab's remembered settings are put back as they were.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

URL = os.environ.get("LORA_TRAIN_BROWSER_URL")
WEBUI = os.environ.get("SD_WEBUI_DIR")
pytestmark = pytest.mark.skipif(not (URL and WEBUI), reason="LORA_TRAIN_BROWSER_URL and SD_WEBUI_DIR are not set")
NAME = "lora_train_browser"  # the dataset folder's name, so the names the tab proposes start with it
SHOTS = Path(os.environ.get("LORA_TRAIN_SHOTS", "browser-shots"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LONG = 300_000  # ms: CPU training and generation in the harness


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                             args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def webui_files():
    """Removes the LoRA files the test writes and restores the tab's remembered settings afterwards."""
    lora_dir, remembered = Path(WEBUI) / "models" / "Lora", Path(WEBUI) / "lora-train-presets" / "last-used.json"
    saved = remembered.read_bytes() if remembered.is_file() else None
    remembered.unlink(missing_ok=True)
    yield lora_dir
    for path in lora_dir.glob(f"{NAME}*.safetensors"):
        path.unlink()
    if saved is None:
        remembered.unlink(missing_ok=True)
    else:
        remembered.write_bytes(saved)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from lora_train.cli_demo import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("browser") / NAME, captions=False)


def open_tab(page, inner: str = "") -> None:
    page.locator("#tabs > .tab-nav button", has_text="LoRA Train").click()
    if inner:
        page.locator("#tab_lora_train .tab-nav button", has_text=inner).click()


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def wait_text(page, elem_id: str, pattern: str, timeout_ms: int = LONG) -> str:
    """The text of the element (gradio 3 gives a Markdown's elem_id to two nested elements: the outer one) once
    it matches the regular expression."""
    page.wait_for_function("([id, p]) => new RegExp(p).test(document.getElementById(id)?.innerText || '')",
                           arg=[elem_id, pattern], timeout=timeout_ms)
    return page.locator(f"#{elem_id}").first.inner_text().strip()


def wait_status(page, pattern: str, timeout_ms: int = LONG) -> str:
    return wait_text(page, "lora_train_status", pattern, timeout_ms)


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#tab_lora_train").screenshot(path=str(SHOTS / name))


def set_field(page, elem_id: str, value) -> None:
    box = field(page, elem_id)
    box.fill(str(value))
    box.press("Tab")  # gradio takes the value on change/blur


def test_a_first_run_in_the_browser(page, webui_files, dataset, tmp_path):
    page.goto(URL)
    load_caption_and_edit(page, dataset, tmp_path)
    train_a_first_run(page, webui_files)
    stop_a_second_run_after_a_reload(page, webui_files)
    generate_and_send_to_txt2img(page)


def load_caption_and_edit(page, dataset: Path, tmp_path: Path) -> None:
    from lora_train.bench_caption import build_tiny_blip

    open_tab(page, "Dataset")
    set_field(page, "lora_train_folder", dataset)
    page.get_by_role("button", name="Load", exact=True).click()
    wait_text(page, "lora_train_report", "8 images\\.", 60_000)

    open_tab(page, "Captioning")
    set_field(page, "lora_train_caption_model", build_tiny_blip(tmp_path / "tiny-blip"))
    set_field(page, "lora_train_caption_prefix", "sks style, ")
    page.get_by_role("button", name="Caption images").click()
    wait_text(page, "lora_train_caption_status", "Done\\.")
    assert all(p.read_text().startswith("sks style, ") for p in dataset.glob("*.txt"))

    open_tab(page, "Dataset")
    cell = page.locator("#lora_train_grid tbody tr").first.locator("td").nth(1)
    cell.wait_for()
    cell.dblclick()
    page.keyboard.press("Control+A")
    page.keyboard.type("sks style, an edited caption")
    page.keyboard.press("Enter")
    wait_text(page, "lora_train_gallery", "an edited caption", 30_000)
    page.locator("#lora_train_save_captions").click()
    wait_text(page, "lora_train_saved", "Saved 1 changed caption", 30_000)
    assert (dataset / "00_red_circle.txt").read_text() == "sks style, an edited caption"
    shot(page, "dataset.png")


def train_a_first_run(page, lora_dir: Path) -> None:
    open_tab(page, "Settings")
    assert field(page, "lora_train_output_output_name").input_value() == NAME, "the name comes from the folder"
    for elem_id, value in {"lora_train_data_resolution": 64, "lora_train_model_lora_rank": 4,
                           "lora_train_training_max_train_steps": 4, "lora_train_training_learning_rate": 1e-3}.items():
        set_field(page, elem_id, value)
    page.locator("#lora_train_model_train_text_encoder input").uncheck()  # the harness's tiny text encoder NaNs
    page.locator("#lora_train_advanced").click()
    set_field(page, "lora_train_data_min_bucket_reso", 64)
    set_field(page, "lora_train_data_max_bucket_reso", 128)
    set_field(page, "lora_train_training_batch_size", 2)

    open_tab(page, "Train")
    set_field(page, "lora_train_preview_every", 2)
    page.locator("#lora_train_start").click()
    done = wait_status(page, r"^Done\.")
    assert re.match(r"Done\. 4 steps in \d+ s", done) and "ETA" not in done, done
    assert (lora_dir / f"{NAME}.safetensors").is_file()
    captions = wait_text(page, "lora_train_previews", "step 4", 30_000)
    assert "step 0" in captions and "step 2" in captions, captions


def stop_a_second_run_after_a_reload(page, lora_dir: Path) -> None:
    open_tab(page, "Settings")
    assert field(page, "lora_train_output_output_name").input_value() == f"{NAME}_2", "the next run's name is free"
    set_field(page, "lora_train_training_max_train_steps", 2000)
    open_tab(page, "Train")
    set_field(page, "lora_train_preview_every", 500)
    page.locator("#lora_train_start").click()
    wait_status(page, r"step [1-9]\d*/2000, loss")
    shot(page, "training.png")

    page.reload()
    open_tab(page, "Train")
    running = wait_status(page, r"step \d+/2000, loss .*ETA", 30_000)
    assert field(page, "lora_train_preview_every").input_value() == "500", "the preview settings came back"
    open_tab(page, "Settings")
    assert field(page, "lora_train_data_resolution").input_value() == "64", "the settings came back"
    assert field(page, "lora_train_output_output_name").input_value() == f"{NAME}_2"
    open_tab(page, "Train")
    step_s = float(re.search(r"([\d.]+) s/step", running).group(1)) if "s/step" in running else 0.5
    clicked = time.monotonic()
    page.get_by_role("button", name="Stop & discard").click()
    stopped = wait_status(page, r"^Stopped\.", 60_000)
    took = time.monotonic() - clicked
    assert "the LoRA was discarded" in stopped and not (lora_dir / f"{NAME}_2.safetensors").exists()
    assert took < step_s + 3, f"Stop & discard took {took:.1f} s at {step_s} s/step"
    print(f"\nStop & discard: {took:.1f} s after the click at {step_s} s/step")


def generate_and_send_to_txt2img(page) -> None:
    open_tab(page, "Test")
    assert field(page, "lora_train_test_name").input_value() == NAME
    prompt = field(page, "lora_train_test_prompt").input_value()
    assert prompt == f"<lora:{NAME}:0.8>, sks style", prompt
    page.get_by_role("button", name=re.compile("^Generate at the training resolution")).click()
    wait_text(page, "lora_train_test_images", "weight 0\\.8")
    shot(page, "test.png")
    page.locator("#lora_train_send_txt2img").click()
    page.locator("#txt2img_prompt textarea").wait_for()
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value.startsWith('<lora:')")
    assert page.locator("#txt2img_prompt textarea").input_value() == prompt
    assert page.locator("#txt2img_seed input").first.input_value() == "1234"
    assert page.locator("#txt2img_width input").first.input_value() == "64"
    assert page.locator("#txt2img_height input").first.input_value() == "64"
    assert page.locator("#txt2img_steps input").first.input_value() == "20"
    assert page.locator("#txt2img_sampling input").first.input_value() == "Euler a"
