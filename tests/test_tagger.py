"""The WD14 tagger on a tiny ONNX model built in code with the real taggers' contract (NHWC 448x448 BGR 0-255
float input, sigmoid outputs in selected_tags.csv order), loaded from a folder on disk and from a hub cache laid
out by hand: thresholds, exclusions, modes, batching, broken images, the CLI, the benchmark, install requests."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import types
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from lora_train import bench_caption, cli_caption, extras  # noqa: E402
from lora_train.caption_writer import CaptionError, FolderOptions, caption_folder, read_caption_csv  # noqa: E402
from lora_train.captioning import DEFAULT_MODEL, create_captioner, suggest_caption_model  # noqa: E402
from lora_train.tagger import (DEFAULT_TAGGER, MODEL_FILE, TAGS_FILE, TaggerOptions, WdTagger,  # noqa: E402
                               create_tagger, is_tagger_model, prepare_image, tagger_files)
from lora_train.tiny_tagger import IMAGE_SIZE, TINY_TAGS, build_tiny_tagger  # noqa: E402

pytest.importorskip("onnxruntime", reason="the tagger tests need onnxruntime (requirements/test.txt)")

# name: (size, colour); padded with white, each mean colour fires one tiny tag (see lora_train/tiny_tagger.py)
PICTURES = {"red.png": ((64, 32), "red"), "green.jpg": ((40, 80), (0, 255, 0)), "blue.webp": ((50, 50), "blue"),
            "white.bmp": ((30, 30), "white"), "dark.png": ((20, 60), (30, 30, 30))}
EXPECTED = {"red.png": "1girl, red theme, solo, ^_^",
            "green.jpg": "hatsune miku (vocaloid), 1girl, solo, ^_^",
            "blue.webp": "blue theme, 1girl, solo, ^_^",  # square: no white padding, so blue is surest
            "white.bmp": "1girl, white background, solo, ^_^",
            "dark.png": "1girl, solo, ^_^"}
ONE_THREAD = {"threads": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    return build_tiny_tagger(tmp_path_factory.mktemp("tagger") / "wd-tiny")


def tagger(folder: Path, **options) -> WdTagger:
    return create_tagger(str(folder), TaggerOptions(**{**ONE_THREAD, **options}))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (size, colour) in PICTURES.items():
        Image.new("RGB", size, colour).save(folder / name)
    return folder


def opened(folder: Path) -> List[Image.Image]:
    return [Image.open(folder / name).convert("RGB") for name in PICTURES]


def sidecars(folder: Path) -> Dict[str, str]:
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))}


def expected_sidecars(prefix: str = "") -> Dict[str, str]:
    return {Path(name).stem: prefix + tags for name, tags in EXPECTED.items()}


def test_the_tiny_model_has_the_real_taggers_contract(tagger_dir):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tagger_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    (model_input,), (output,) = session.get_inputs(), session.get_outputs()
    assert model_input.type == "tensor(float)" and model_input.shape[1:] == [IMAGE_SIZE, IMAGE_SIZE, 3]
    assert output.shape[1] == len(TINY_TAGS)
    header, *rows = (tagger_dir / TAGS_FILE).read_text(encoding="utf-8").splitlines()
    assert header == "tag_id,name,category,count" and [row.split(",")[1] for row in rows] == [t[0] for t in TINY_TAGS]
    scores = session.run(None, {model_input.name: np.full((2, IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.float32)})[0]
    assert scores.shape == (2, len(TINY_TAGS)) and ((0 < scores) & (scores < 1)).all()


def test_an_image_is_padded_white_to_a_square_then_given_as_bgr_0_to_255():
    pixels = prepare_image(Image.new("RGB", (40, 20), (255, 0, 0)), 40)
    assert pixels.shape == (40, 40, 3) and pixels.dtype == np.float32
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[39, 20].tolist() == [255, 255, 255], "white padding"
    assert pixels[20, 20].tolist() == [0, 0, 255], "red is the last channel: BGR, not normalised"
    assert prepare_image(Image.new("RGB", (10, 30), "blue"), IMAGE_SIZE).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_tags_follow_the_colours_characters_first_then_by_confidence(tagger_dir, images):
    model = tagger(tagger_dir)
    assert model.caption(opened(images)) == list(EXPECTED.values())
    assert model.image_size == IMAGE_SIZE and model.device() == "cpu"


@pytest.mark.parametrize("options, red, green", [
    ({"general_threshold": 0.9}, "1girl, red theme", "hatsune miku (vocaloid), 1girl"),
    ({"general_threshold": 0.15}, "1girl, red theme, solo, ^_^, long hair",
     "hatsune miku (vocaloid), 1girl, solo, ^_^, long hair"),
    ({"character_threshold": 0.97}, EXPECTED["red.png"], "1girl, solo, ^_^"),
    ({"exclude_tags": ("solo", "long_hair", "Red Theme")}, "1girl, ^_^", "hatsune miku (vocaloid), 1girl, ^_^"),
    ({"exclude_tags": ("hatsune miku (vocaloid)",)}, EXPECTED["red.png"], "1girl, solo, ^_^"),
    ({"underscores_to_spaces": False}, "1girl, red_theme, solo, ^_^", "hatsune_miku_(vocaloid), 1girl, solo, ^_^"),
    ({"rating_tags": True}, "general, " + EXPECTED["red.png"], "general, " + EXPECTED["green.jpg"]),
    ({"rating_tags": True, "exclude_tags": ("general",)}, "sensitive, " + EXPECTED["red.png"],
     "sensitive, " + EXPECTED["green.jpg"]),
])
def test_thresholds_exclusions_underscores_and_ratings(tagger_dir, images, options, red, green):
    assert tagger(tagger_dir, **options).caption(opened(images)[:2]) == [red, green]


def test_an_image_with_no_tag_over_the_thresholds_is_reported_not_written(tagger_dir, images):
    report = caption_folder(images, tagger(tagger_dir, general_threshold=1.0, character_threshold=1.0))
    assert report.captioned == 0 and not list(images.glob("*.txt"))
    assert {reason for _, reason in report.failed} == {"no tag reached the thresholds; lower general_threshold"}


def test_batches_give_what_one_by_one_gives(tagger_dir, images):
    model = tagger(tagger_dir)
    pictures = opened(images)
    np.testing.assert_allclose(model.probabilities(pictures, 4), model.probabilities(pictures, 1), atol=1e-5)
    for batch_size in (1, 3):
        folder = images.parent / f"batch-{batch_size}"
        folder.mkdir()
        for name in PICTURES:
            (folder / name).write_bytes((images / name).read_bytes())
        caption_folder(folder, tagger(tagger_dir, batch_size=batch_size), FolderOptions(prefix="sks, "))
        assert sidecars(folder) == expected_sidecars("sks, ")


def test_skip_leaves_hand_written_captions_untouched_then_overwrite_and_append(tagger_dir, images):
    hand = images / "red.txt"
    hand.write_bytes(b"my own words, 1girl\r\n")
    stamp = hand.stat().st_mtime_ns
    report = caption_folder(images, tagger(tagger_dir), FolderOptions(prefix="sks style, "))
    assert (report.captioned, report.skipped, report.failed) == (len(PICTURES) - 1, 1, [])
    assert hand.read_bytes() == b"my own words, 1girl\r\n" and hand.stat().st_mtime_ns == stamp
    assert sidecars(images) == dict(expected_sidecars("sks style, "), red="my own words, 1girl\n")

    report = caption_folder(images, tagger(tagger_dir), FolderOptions(mode="append", prefix="sks style, "))
    assert report.captioned == len(PICTURES)
    assert sidecars(images)["red"] == "my own words, 1girl, sks style, red theme, solo, ^_^", "only the new tags"
    assert sidecars(images)["blue"] == "sks style, " + EXPECTED["blue.webp"], "nothing new to add"

    caption_folder(images, tagger(tagger_dir), FolderOptions(mode="overwrite"))
    assert sidecars(images) == expected_sidecars()


def test_broken_images_are_reported_and_the_rest_tagged(tagger_dir, images):
    good = (images / "red.png").read_bytes()
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    (images / "text.jpg").write_text("not an image", encoding="utf-8")
    (images / "empty.webp").write_bytes(b"")
    report = caption_folder(images, tagger(tagger_dir, batch_size=2))
    assert report.captioned == len(PICTURES) and sidecars(images) == expected_sidecars()
    assert sorted(path.name for path, _ in report.failed) == ["empty.webp", "text.jpg", "truncated.png"]
    assert "failed: " in report.summary()


def test_tags_go_to_a_metadata_csv_too(tagger_dir, images):
    csv_path = images / "metadata.csv"
    caption_folder(images, tagger(tagger_dir), FolderOptions(write_txt=False, csv_path=csv_path))
    assert read_caption_csv(csv_path) == EXPECTED and not list(images.glob("*.txt"))


def test_the_model_picks_the_tagger(tagger_dir, tmp_path):
    assert is_tagger_model(str(tagger_dir)) and is_tagger_model(DEFAULT_TAGGER)
    assert is_tagger_model("SmilingWolf/wd-v1-4-convnext-tagger-v2") and not is_tagger_model(DEFAULT_MODEL)
    assert not is_tagger_model(str(tmp_path)), "a folder without selected_tags.csv is not a tagger"
    assert isinstance(create_captioner(str(tagger_dir)), WdTagger)


def hub_cache(root: Path, repo: str, tagger_dir: Path) -> Path:
    """The Hugging Face cache layout of a downloaded repository: refs/main naming a snapshot with the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit, encoding="utf-8")
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in (MODEL_FILE, TAGS_FILE):
        (snapshot / name).write_bytes((tagger_dir / name).read_bytes())
    return root


def test_a_hub_id_loads_from_the_cache_offline_and_a_missing_one_says_what_to_give(tagger_dir, tmp_path,
                                                                                     monkeypatch, images):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported before HF_HUB_OFFLINE=1 was set; this test must not go online")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", DEFAULT_TAGGER, tagger_dir)))
    model_path, tags_path = tagger_files(DEFAULT_TAGGER)
    assert model_path.name == MODEL_FILE and tags_path.read_bytes() == (tagger_dir / TAGS_FILE).read_bytes()
    assert tagger(DEFAULT_TAGGER).caption(opened(images)[:1]) == [EXPECTED["red.png"]]
    with pytest.raises(CaptionError, match="cannot be loaded .*downloaded already"):
        tagger_files("SmilingWolf/wd-eva02-large-tagger-v3")


def test_bad_tagger_folders_and_options_say_how_to_fix_them(tagger_dir, tmp_path):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / TAGS_FILE).write_bytes((tagger_dir / TAGS_FILE).read_bytes())
    with pytest.raises(CaptionError, match="has no model.onnx"):
        create_tagger(str(incomplete))
    (incomplete / MODEL_FILE).write_bytes((tagger_dir / MODEL_FILE).read_bytes())
    (incomplete / TAGS_FILE).write_text("id,tag\n1,x\n", encoding="utf-8")
    with pytest.raises(CaptionError, match="header tag_id,name,category,count"):
        create_tagger(str(incomplete))
    (incomplete / TAGS_FILE).write_text("tag_id,name,category,count\n1,x,0,5\n", encoding="utf-8")
    with pytest.raises(CaptionError, match=f"gives {len(TINY_TAGS)} scores but its selected_tags.csv lists 1"):
        create_tagger(str(incomplete), TaggerOptions(**ONE_THREAD)).load()
    for options, message in (({"general_threshold": 1.5}, "probability from 0 to 1"),
                             ({"batch_size": 0}, "batch_size is 0"), ({"device": "gpu"}, "use auto, cpu")):
        with pytest.raises(CaptionError, match=message):
            TaggerOptions(**options).validate()


def test_without_onnxruntime_loading_says_which_pip_command(tagger_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install onnxruntime==\d"):
        tagger(tagger_dir).load()


def parse(module, argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    return parser.parse_args(["caption", *argv])


def test_cli_tags_with_the_tagger_flags(tagger_dir, images, capsys):
    args = parse(cli_caption, ["--input", str(images), "--model", str(tagger_dir), "--prefix", "sks, ",
                               "--general-threshold", "0.9", "--exclude-tags", "hatsune miku (vocaloid)",
                               "--keep-underscores", "--rating-tags", "--batch-size", "2", "--device", "cpu"])
    assert args.func(args) == 0
    assert sidecars(images)["red"] == "sks, general, 1girl, red_theme"
    assert sidecars(images)["green"] == "sks, general, 1girl"
    assert f"captioned {len(PICTURES)}, skipped 0" in capsys.readouterr().out
    bad = parse(cli_caption, ["--input", str(images), "--model", str(tagger_dir), "--character-threshold", "2"])
    assert bad.func(bad) == 2 and "character_threshold is 2.0" in capsys.readouterr().err


def test_bench_has_rows_for_the_tiny_tagger(capsys):
    args = parse(bench_caption, ["--model", "tiny-tagger", "--images", "3", "--batch-sizes", "1,2", "--device", "cpu"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "tiny-tagger (wd14) on cpu" in lines[0] and f"{IMAGE_SIZE}x{IMAGE_SIZE} input" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["1", "2"] and lines[2].endswith("1.00x")


@pytest.mark.parametrize("family, name, metadata, model", [
    ("sdxl", "ponyDiffusionV6XL", {}, DEFAULT_TAGGER),
    ("sdxl", "model", {"modelspec.title": "Illustrious XL v1.0"}, DEFAULT_TAGGER),
    ("sdxl", "my_merge", {"ss_tag_frequency": '{"10_x": {"1girl": 40, "smile": 3}}'}, DEFAULT_TAGGER),
    ("sdxl", "juggernautXL", {"ss_tag_frequency": '{"10_x": {"a photo of a man": 4}}'}, DEFAULT_MODEL),
    ("sd1", "anything-v5-anime", {}, DEFAULT_MODEL),
])
def test_the_suggestion_is_the_tagger_for_booru_sdxl_checkpoints_only(family, name, metadata, model):
    suggested, why = suggest_caption_model(family, name, metadata)
    assert suggested == model and why


def test_picking_the_tagger_is_noted_for_install_py(tmp_path, monkeypatch):
    assert extras.requested_packages(tmp_path) == []
    extras.request_install("tagger", tmp_path)
    extras.request_install("tagger", tmp_path)
    assert extras.read_requests(tmp_path) == ["tagger"]
    installs: List[str] = []
    launch = types.SimpleNamespace(is_installed=lambda module: module == "tensorboard",
                                   run_pip=lambda command, description: installs.append(command))
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(extras, "EXTENSION_DIR", tmp_path)
    runpy.run_path(str(Path(__file__).parents[1] / "install.py"))
    assert installs == [f"install {extras.EXTRAS['tagger'][1]}"]
    monkeypatch.setattr(extras, "EXTENSION_DIR", tmp_path / "nothing-requested")
    installs.clear()
    runpy.run_path(str(Path(__file__).parents[1] / "install.py"))
    assert installs == [], "onnxruntime is installed only once the tagger was picked"
