"""Tests for lora_train.dataset: scanning, captions, buckets and pixels, on tiny images made here (epoch batches and
captions at training time: test_dataset_batches.py)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_train.captions_io import read_metadata_csv
from lora_train.config import DataConfig
from lora_train.dataset import Dataset, DatasetError, load_dataset, make_buckets, nearest_bucket

RESOLUTION = 128
MIN_RESO = 64
MAX_RESO = 256
RED = (200, 30, 30)
BLUE = (30, 30, 200)
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise to display
BOM = "\ufeff"


def make_config(root: Path, **overrides) -> DataConfig:
    values = dict(train_data_dir=str(root), resolution=RESOLUTION, min_bucket_reso=MIN_RESO,
                  max_bucket_reso=MAX_RESO)
    values.update(overrides)
    return DataConfig(**values)


def save_image(path: Path, size=(96, 64), mode="RGB", color=RED, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_args)
    return path


def png_bytes(size=(96, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(size=(96, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def captions_by_name(dataset: Dataset) -> dict:
    return {sample.path.name: sample.caption for sample in dataset.samples}


def tree_hashes(root: Path) -> dict:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def two_images(tmp_path: Path) -> Path:
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.jpg", size=(64, 128))
    return tmp_path


# Captions


def test_sidecar_captions_are_stripped_and_bom_free(two_images: Path):
    (two_images / "a.txt").write_text("  mychar, red dress \n", encoding="utf-8")
    (two_images / "b.txt").write_text(BOM + "mychar, smiling", encoding="utf-8")
    dataset = load_dataset(make_config(two_images))
    assert captions_by_name(dataset) == {"a.png": "mychar, red dress", "b.jpg": "mychar, smiling"}
    assert dataset.report.caption_source == "sidecar .txt"
    assert dataset.report.missing_captions == []


def test_custom_caption_extension(two_images: Path):
    (two_images / "a.caption").write_text("from caption file", encoding="utf-8")
    (two_images / "a.txt").write_text("from txt", encoding="utf-8")
    dataset = load_dataset(make_config(two_images, caption_extension=".caption"))
    assert captions_by_name(dataset)["a.png"] == "from caption file"
    assert dataset.report.skipped == []  # neither sidecar type is reported as an unsupported file


def test_csv_with_bom_and_quoted_commas(tmp_path: Path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "10_sub" / "x.png")
    csv_text = BOM + 'file_name,text\na.png,"mychar, red dress, outdoors"\n10_sub/x.png,"a ""quoted"" word"\n'
    (tmp_path / "metadata.csv").write_text(csv_text, encoding="utf-8")
    assert read_metadata_csv(tmp_path / "metadata.csv") == {
        "a.png": "mychar, red dress, outdoors", "10_sub/x.png": 'a "quoted" word'}
    dataset = load_dataset(make_config(tmp_path))
    assert captions_by_name(dataset) == {"a.png": "mychar, red dress, outdoors", "x.png": 'a "quoted" word'}
    assert dataset.report.caption_source == "metadata.csv"


def test_csv_from_metadata_path_outside_the_folder(tmp_path: Path):
    images = tmp_path / "images"
    save_image(images / "a.png")
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("image,prompt\nimages/a.png,from elsewhere\n", encoding="utf-8")
    dataset = load_dataset(make_config(images, metadata_path=str(csv_path)))
    assert captions_by_name(dataset) == {"a.png": "from elsewhere"}
    assert dataset.report.caption_source == "captions.csv"


def test_sidecar_wins_over_csv_row(two_images: Path):
    (two_images / "a.txt").write_text("from sidecar", encoding="utf-8")
    (two_images / "metadata.csv").write_text("filename,caption\na.png,from csv\nb.jpg,only in csv\n",
                                             encoding="utf-8")
    dataset = load_dataset(make_config(two_images))
    assert captions_by_name(dataset) == {"a.png": "from sidecar", "b.jpg": "only in csv"}
    assert dataset.report.caption_source == "sidecar .txt + metadata.csv"
    assert dataset.report.csv_rows_without_image == []


def test_csv_rows_naming_missing_or_broken_files_are_reported(two_images: Path):
    (two_images / "broken.png").write_bytes(b"")
    (two_images / "metadata.csv").write_text(
        "filename,prompt\na.png,ok\ngone.png,no such file\nbroken.png,empty file\n", encoding="utf-8")
    dataset = load_dataset(make_config(two_images))
    assert dataset.report.csv_rows_without_image == ["broken.png", "gone.png"]
    assert "gone.png" in dataset.report.summary()


def test_csv_without_recognisable_header_raises(two_images: Path):
    (two_images / "metadata.csv").write_text("a.png,some caption\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="filename, file_name, image.*prompt, text, caption"):
        load_dataset(make_config(two_images))


def test_unreadable_sidecar_is_reported_and_csv_used(two_images: Path):
    (two_images / "a.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    (two_images / "metadata.csv").write_text("filename,prompt\na.png,from csv\n", encoding="utf-8")
    dataset = load_dataset(make_config(two_images))
    assert captions_by_name(dataset)["a.png"] == "from csv"
    assert dict(dataset.report.skipped)["a.txt"].startswith("caption is not UTF-8")


def test_csv_not_utf8_or_missing_raises(two_images: Path):
    (two_images / "metadata.csv").write_bytes("filename,prompt\na.png,caf\u00e9\n".encode("cp1252"))
    with pytest.raises(DatasetError, match="UTF-8"):
        load_dataset(make_config(two_images))
    with pytest.raises(DatasetError, match="metadata_path"):
        load_dataset(make_config(two_images, metadata_path=str(two_images / "nope.csv")))


def test_image_without_caption_is_kept_and_reported(two_images: Path):
    (two_images / "a.txt").write_text("captioned", encoding="utf-8")
    (two_images / "b.txt").write_text("   \n", encoding="utf-8")  # an empty sidecar counts as none
    dataset = load_dataset(make_config(two_images))
    assert captions_by_name(dataset) == {"a.png": "captioned", "b.jpg": ""}
    assert dataset.report.missing_captions == ["b.jpg"]


def test_no_caption_anywhere_gives_source_none(two_images: Path):
    report = load_dataset(make_config(two_images)).report
    assert report.caption_source == "none"
    assert report.missing_captions == ["a.png", "b.jpg"]


# Scanning


def test_repeat_folders_nearest_wins_and_default_elsewhere(tmp_path: Path):
    save_image(tmp_path / "top.png")
    save_image(tmp_path / "10_mychar" / "a.png")
    save_image(tmp_path / "10_mychar" / "3_close" / "plain" / "b.PNG")
    save_image(tmp_path / "styles" / "c.webp")
    save_image(tmp_path / "0_off" / "d.png")
    dataset = load_dataset(make_config(tmp_path, repeats=2))
    repeats = {sample.path.name: (sample.repeats, sample.folder) for sample in dataset.samples}
    assert repeats == {"top.png": (2, ""), "a.png": (10, "10_mychar"), "b.PNG": (3, "10_mychar/3_close/plain"),
                       "c.webp": (2, "styles")}
    assert [path for path, _ in dataset.report.skipped] == ["0_off/d.png"]


def test_broken_and_unsupported_files_are_skipped_and_reported(two_images: Path):
    (two_images / "zero.png").write_bytes(b"")
    (two_images / "cut.png").write_bytes(png_bytes()[: len(png_bytes()) // 2])
    (two_images / "cut.jpg").write_bytes(jpeg_bytes()[: len(jpeg_bytes()) // 2])
    (two_images / "text.png").write_text("I am not an image", encoding="utf-8")
    save_image(two_images / "anim.gif", mode="P", color=1)
    for name in ("notes.json", "cache.npz", "settings.yaml", ".DS_Store", "old.safetensors"):
        (two_images / name).write_bytes(b"x")
    dataset = load_dataset(make_config(two_images))
    skipped = dict(dataset.report.skipped)
    assert sorted(skipped) == ["anim.gif", "cut.jpg", "cut.png", "text.png", "zero.png"]
    assert skipped["anim.gif"] == "not a supported image type: .gif"
    assert skipped["zero.png"].startswith("empty file")
    assert all(skipped[name].startswith("unreadable image") for name in ("cut.jpg", "cut.png", "text.png"))
    assert [sample.path.name for sample in dataset.samples] == ["a.png", "b.jpg"]
    assert dataset.report.images_found == 2


def test_nothing_usable_raises_with_counts(tmp_path: Path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a jpeg", encoding="utf-8")
    save_image(tmp_path / "anim.gif", mode="P", color=1)
    with pytest.raises(DatasetError) as error:
        load_dataset(make_config(tmp_path))
    message = str(error.value)
    assert "3 files skipped" in message
    assert "1 unreadable image" in message and "1 empty file" in message and "1 not a supported image type" in message


def test_empty_folder_raises(tmp_path: Path):
    with pytest.raises(DatasetError, match="no images in"):
        load_dataset(make_config(tmp_path))


def test_summary_caps_long_lists(tmp_path: Path):
    save_image(tmp_path / "a.png")
    for number in range(30):
        (tmp_path / f"clip{number:02d}.gif").write_bytes(b"GIF89a")
    summary = load_dataset(make_config(tmp_path)).report.summary()
    assert "30 files skipped" in summary
    assert "clip19.gif" in summary and "clip20.gif" not in summary
    assert "... and 10 more" in summary


def test_source_files_are_not_modified(two_images: Path):
    (two_images / "a.txt").write_text("caption", encoding="utf-8")
    save_image(two_images / "rot.jpg", exif=_orientation_exif())
    (two_images / "cut.png").write_bytes(png_bytes()[:100])
    before = tree_hashes(two_images)
    dataset = load_dataset(make_config(two_images))
    for index in range(len(dataset.samples)):
        dataset.load_pixels(index, flip=True)
    assert tree_hashes(two_images) == before


# Buckets and pixels


def _orientation_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    return exif


def test_exif_orientation_is_honoured(tmp_path: Path):
    stored = Image.new("RGB", (192, 64), BLUE)  # stored landscape, red on the left; shown portrait, red on top
    stored.paste(RED, (0, 0, 96, 64))
    stored.save(tmp_path / "rot.jpg", exif=_orientation_exif(), quality=95)
    dataset = load_dataset(make_config(tmp_path))
    width, height = dataset.samples[0].bucket
    assert height > width
    pixels = dataset.load_pixels(0)
    assert pixels.shape == (3, height, width)
    top_red, bottom_red = pixels[0, : height // 4].mean(), pixels[0, -height // 4:].mean()
    assert top_red > 0.3 and bottom_red < -0.5


@pytest.mark.parametrize("mode, color, expected", [
    ("RGBA", (0, 0, 0, 0), 1.0),  # fully transparent black: white once composited
    ("LA", (0, 0), 1.0),
    ("P", 0, 1.0),  # palette index 0 is marked transparent below
    ("L", 0, -1.0),
    ("CMYK", (0, 0, 0, 0), 1.0),  # no ink: white
])
def test_other_modes_become_rgb(tmp_path: Path, mode, color, expected):
    save_image(tmp_path / ("x.png" if mode != "CMYK" else "x.jpg"), size=(64, 64), mode=mode, color=color,
               **({"transparency": 0} if mode == "P" else {}))
    pixels = load_dataset(make_config(tmp_path)).load_pixels(0)
    assert pixels.shape == (3, 128, 128)
    assert torch.allclose(pixels, torch.full_like(pixels, expected), atol=1e-6)


def test_buckets_are_multiples_of_64_within_limits():
    buckets = make_buckets(512, 256, 1024)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert 256 <= width <= 1024 and 256 <= height <= 1024
        assert width * height <= 512 * 512
    assert {(height, width) for width, height in buckets} == set(buckets)
    for width in range(256, 1025, 64):  # each width keeps the tallest height that fits
        assert max(h for w, h in buckets if w == width) == min(1024, 512 * 512 // width // 64 * 64)


def test_nearest_bucket_by_aspect_ratio_ties_to_larger_area():
    assert nearest_bucket((1000, 500), [(128, 128), (192, 64), (128, 64)]) == (128, 64)
    assert nearest_bucket((300, 300), [(64, 64), (128, 128), (128, 64)]) == (128, 128)


def test_no_bucket_fits_raises(two_images: Path):
    with pytest.raises(DatasetError, match="min_bucket_reso"):
        load_dataset(make_config(two_images, resolution=128, min_bucket_reso=192))


@pytest.mark.parametrize("size", [(96, 64), (64, 200), (300, 301), (17, 500), (1000, 90)])
def test_loaded_tensor_matches_bucket_and_range(tmp_path: Path, size):
    path = tmp_path / "noise.png"
    path.write_bytes(png_bytes(size))
    dataset = load_dataset(make_config(tmp_path))
    width, height = dataset.samples[0].bucket
    pixels = dataset.load_pixels(0)
    assert pixels.dtype == torch.float32
    assert pixels.shape == (3, height, width)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels.min() < -0.5 and pixels.max() > 0.5  # noise spans the range: values were scaled, not clamped


def test_flip_mirrors_the_width(tmp_path: Path):
    (tmp_path / "noise.png").write_bytes(png_bytes((128, 128)))
    dataset = load_dataset(make_config(tmp_path))
    assert torch.equal(dataset.load_pixels(0, flip=True), dataset.load_pixels(0).flip(-1))


def test_without_buckets_every_image_is_square(two_images: Path):
    dataset = load_dataset(make_config(two_images, enable_bucket=False))
    assert {sample.bucket for sample in dataset.samples} == {(RESOLUTION, RESOLUTION)}
    assert dataset.load_pixels(1).shape == (3, RESOLUTION, RESOLUTION)


def test_a_16_bit_greyscale_png_trains_as_its_grey_not_white(tmp_path: Path):
    import numpy as np

    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")  # half grey
    pixels = load_dataset(make_config(tmp_path)).load_pixels(0)
    torch.testing.assert_close(pixels, torch.full_like(pixels, 128 / 127.5 - 1))


def test_duplicate_csv_rows_are_reported_and_the_last_wins(tmp_path: Path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text("filename,prompt\na.png,first\nb.png,only\na.png,second\n",
                                           encoding="utf-8")
    dataset = load_dataset(make_config(tmp_path))
    assert [s.caption for s in dataset.samples] == ["second", "only"]
    assert dataset.report.csv_duplicates == ["a.png (2 rows)"]
    assert "a.png (2 rows)" in dataset.report.summary()


@pytest.mark.parametrize("resolution", [64, 128, 192])
def test_bucket_limits_the_user_did_not_set_follow_a_small_resolution(tmp_path: Path, resolution):
    save_image(tmp_path / "wide.png", size=(96, 64))
    config = DataConfig(train_data_dir=str(tmp_path), resolution=resolution)
    config.validate()
    sample = load_dataset(config).samples[0]
    assert sample.bucket[0] * sample.bucket[1] <= resolution ** 2 and sample.bucket[0] >= sample.bucket[1]
    assert DataConfig(train_data_dir=str(tmp_path)).bucket_range == (256, 1024), "kohya's limits at 512"
