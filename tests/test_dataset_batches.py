"""Tests for lora_train.dataset at training time: epoch batches (one bucket each, repeats, determinism), the
captions a step trains on (shuffle, keep_tokens, dropout) and the tag frequencies recorded in the file."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lora_train.dataset import Dataset, load_dataset
from tests.test_dataset import make_config, save_image


@pytest.fixture
def mixed_dataset(tmp_path: Path) -> Dataset:
    for number in range(3):
        save_image(tmp_path / f"wide{number}.png", size=(256, 64))
    for number in range(2):
        save_image(tmp_path / "3_tall" / f"tall{number}.png", size=(64, 256))
    save_image(tmp_path / "square.png", size=(100, 100))
    return load_dataset(make_config(tmp_path))


def test_epoch_batches_hold_one_bucket_and_respect_repeats(mixed_dataset: Dataset):
    batches = mixed_dataset.epoch_batches(batch_size=4, epoch=0, seed=7)
    for batch in batches:
        assert len({mixed_dataset.samples[index].bucket for index in batch}) == 1
        assert 1 <= len(batch) <= 4
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == sorted(i for i, s in enumerate(mixed_dataset.samples) for _ in range(s.repeats))
    assert sum(mixed_dataset.bucket_counts().values()) == len(flat) == 3 + 2 * 3 + 1
    assert len(batches) == mixed_dataset.steps_per_epoch(4) == 1 + 2 + 1  # partial batches are kept


def test_epoch_batches_are_deterministic_and_leave_global_rng_alone(mixed_dataset: Dataset):
    random.seed(123)
    state = random.getstate()
    first = mixed_dataset.epoch_batches(2, epoch=1, seed=42)
    assert random.getstate() == state
    assert mixed_dataset.epoch_batches(2, epoch=1, seed=42) == first
    others = [mixed_dataset.epoch_batches(2, epoch=epoch, seed=42) for epoch in range(2, 6)]
    assert any(batches != first for batches in others)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 100])
def test_steps_per_epoch_matches_epoch_batches(mixed_dataset: Dataset, batch_size: int):
    assert mixed_dataset.steps_per_epoch(batch_size) == len(mixed_dataset.epoch_batches(batch_size, 0, 0))


def _one_caption_dataset(tmp_path: Path, caption: str, **overrides) -> Dataset:
    save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(caption, encoding="utf-8")
    return load_dataset(make_config(tmp_path, **overrides))


def test_caption_shuffle_keeps_leading_tokens(tmp_path: Path):
    dataset = _one_caption_dataset(tmp_path, "mychar, red dress,smile , outdoors, night, rain",
                                   shuffle_captions=True, keep_tokens=2)
    rng = random.Random(0)
    results = {dataset.caption_for(0, rng) for _ in range(50)}
    assert len(results) > 1
    for caption in results:
        tags = caption.split(", ")
        assert tags[:2] == ["mychar", "red dress"]
        assert sorted(tags[2:]) == ["night", "outdoors", "rain", "smile"]


def test_caption_unchanged_without_shuffle(tmp_path: Path):
    dataset = _one_caption_dataset(tmp_path, "mychar,red dress")
    assert dataset.caption_for(0, random.Random(0)) == "mychar,red dress"


def test_caption_dropout(tmp_path: Path):
    always = _one_caption_dataset(tmp_path, "mychar, smile", caption_dropout=1.0)
    assert always.caption_for(0, random.Random(0)) == ""
    always.config.caption_dropout = 0.5
    results = [always.caption_for(0, random.Random(seed)) for seed in range(200)]
    assert 50 < results.count("") < 150 and results.count("mychar, smile") == 200 - results.count("")


def test_tag_frequency_per_folder(tmp_path: Path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "5_char" / "b.png")
    (tmp_path / "a.txt").write_text("Smile, red", encoding="utf-8")
    (tmp_path / "5_char" / "b.txt").write_text("smile, , blue", encoding="utf-8")
    frequency = load_dataset(make_config(tmp_path)).tag_frequency()
    assert frequency == {"root": {"smile": 1, "red": 1}, "5_char": {"smile": 1, "blue": 1}}
