"""Captioning faults that must not cost captions: lengths beyond a small model's text positions, a crash after
some batches of a metadata.csv run, and image paths a UTF-8 CSV cannot name."""

from __future__ import annotations

import os

import pytest

from lora_train.caption_writer import FolderOptions, caption_folder
from lora_train.captioning import CaptionOptions, create_captioner
from lora_train.captions_io import read_metadata_csv
from lora_train.images import open_rgb
from tiny_captioners import build_tiny_blip, write_images

NAMES = ["a.png", "b.jpg", "c.jpeg", "d.webp", "e.bmp", "f.png"]


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """A tiny BLIP, batch size 2, greedy."""
    folder = build_tiny_blip(tmp_path_factory.mktemp("blip"))
    return create_captioner(str(folder), CaptionOptions(batch_size=2, num_beams=1, max_length=20, min_length=5,
                                                        device="cpu"))


@pytest.fixture
def images(tmp_path):
    write_images(tmp_path / "images", NAMES)
    return tmp_path / "images"


def test_lengths_beyond_a_small_models_text_positions_are_clamped_not_a_traceback(tmp_path, images):
    short = create_captioner(str(build_tiny_blip(tmp_path / "short", text_positions=12)),
                             CaptionOptions(batch_size=2, num_beams=1, max_length=75, min_length=40, device="cpu"))
    captions = short.caption([open_rgb(images / "a.png")])
    assert len(captions) == 1 and captions[0]
    assert len(short.processor.tokenizer(captions[0]).input_ids) <= 12 + 2


def test_a_metadata_csv_is_written_after_every_batch(blip, images, tmp_path):
    csv_path = tmp_path / "metadata.csv"
    seen = []

    def progress(done, total):
        seen.append((done, len(read_metadata_csv(csv_path)) if csv_path.is_file() else 0))
    caption_folder(images, blip, FolderOptions(write_txt=False, csv_path=csv_path), progress=progress)
    assert seen == [(0, 0), (2, 2), (4, 4), (6, 6)], "a crash after a batch keeps the captions of every batch"


def test_a_path_that_is_not_utf8_does_not_abort_the_csv(blip, tmp_path):
    folder = tmp_path / "images"
    write_images(folder, ["a.png", os.fsdecode(b"caf\xe9/b.png")])
    csv_path = folder / "metadata.csv"
    report = caption_folder(folder, blip, FolderOptions(write_txt=False, csv_path=csv_path, recursive=True))
    assert report.captioned == 1 and list(read_metadata_csv(csv_path)) == ["a.png"]
    [(path, reason)] = report.failed
    assert path.name == "b.png" and "not valid UTF-8" in reason and "rename" in reason
    both = caption_folder(folder, blip, FolderOptions(write_txt=True, csv_path=csv_path, recursive=True,
                                                      mode="overwrite"))
    assert both.captioned == 2 and not both.failed and (folder / os.fsdecode(b"caf\xe9") / "b.txt").is_file()
