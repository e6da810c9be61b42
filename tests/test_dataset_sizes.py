"""Dataset.size_info (what SDXL's size conditioning is told) against crops worked out by hand and against the
pixels load_pixels returns, for non-square images, bucketed and not, flipped and not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lora_train.config import DataConfig
from lora_train.dataset import load_dataset
from lora_train.models import SizeInfo

RESOLUTION = 128  # buckets in [64, 256]: (64, 256), (64, 192), (128, 128), (192, 64), (256, 64)
MARKER = (255, 0, 255)
BACKGROUND = (0, 128, 0)

# (source width, height), buckets on, flip -> SizeInfo((h, w) original, (top, left) crop, (h, w) target)
CASES = [
    # 300x90 (ratio 3.3) -> bucket 192x64; scale max(192/300, 64/90) = 64/90; resized round(300*64/90) = 213 x 64;
    # left = (213 - 192) // 2 = 10; flipped, the crop's left edge mirrors to 213 - 192 - 10 = 11
    ((300, 90), True, False, SizeInfo((90, 300), (0, 10), (64, 192))),
    ((300, 90), True, True, SizeInfo((90, 300), (0, 11), (64, 192))),
    # 90x300 -> bucket 64x192; resized 64 x 213; top = (213 - 192) // 2 = 10; a flip mirrors columns only
    ((90, 300), True, False, SizeInfo((300, 90), (10, 0), (192, 64))),
    ((90, 300), True, True, SizeInfo((300, 90), (10, 0), (192, 64))),
    # no buckets: the 128 square; 210x100: scale 128/100; resized round(268.8) = 269 x 128; left (269-128)//2 = 70,
    # flipped 269 - 128 - 70 = 71
    ((210, 100), False, False, SizeInfo((100, 210), (0, 70), (128, 128))),
    ((210, 100), False, True, SizeInfo((100, 210), (0, 71), (128, 128))),
    # 100x250: scale 128/100; resized 128 x 320; top (320 - 128) // 2 = 96
    ((100, 250), False, True, SizeInfo((250, 100), (96, 0), (128, 128))),
]


def dataset_of(folder: Path, image: Image.Image, enable_bucket: bool):
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / "image.png")
    return load_dataset(DataConfig(train_data_dir=str(folder), resolution=RESOLUTION, min_bucket_reso=64,
                                   max_bucket_reso=256, enable_bucket=enable_bucket))


def noise_image(size) -> Image.Image:
    return Image.effect_noise(size, 64).convert("RGB")


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@pytest.mark.parametrize("size, enable_bucket, flip, expected", CASES)
def test_size_info_is_the_crop_worked_out_by_hand(tmp_path, size, enable_bucket, flip, expected):
    dataset = dataset_of(tmp_path / "images", noise_image(size), enable_bucket)
    assert dataset.size_info(0, flip) == expected


@pytest.mark.parametrize("size, enable_bucket, flip, expected", CASES)
def test_load_pixels_crops_where_size_info_says(tmp_path, size, enable_bucket, flip, expected):
    """The resized image (mirrored for a flip) cropped at size_info's offset is exactly what load_pixels returns."""
    image = noise_image(size)
    dataset = dataset_of(tmp_path / "images", image, enable_bucket)
    info = dataset.size_info(0, flip)
    (height, width), (top, left) = info.target, info.crop_top_left
    scale = max(width / size[0], height / size[1])
    resized = image.resize((max(width, round(size[0] * scale)), max(height, round(size[1] * scale))),
                           Image.Resampling.LANCZOS)
    if flip:
        resized = ImageOps.mirror(resized)
    expected_pixels = as_tensor(resized.crop((left, top, left + width, top + height)))
    assert torch.equal(dataset.load_pixels(0, flip), expected_pixels)


def test_a_marker_pixel_lands_where_the_crop_puts_it(tmp_path):
    """201x128 needs no resize for the 128 square: left = (201 - 128) // 2 = 36, flipped 201 - 128 - 36 = 37."""
    image = Image.new("RGB", (201, 128), BACKGROUND)
    image.putpixel((40, 5), MARKER)  # (x, y) in the source
    dataset = dataset_of(tmp_path / "images", image, enable_bucket=False)
    plain, flipped = dataset.size_info(0), dataset.size_info(0, flip=True)
    assert (plain.crop_top_left, flipped.crop_top_left) == ((0, 36), (0, 37))
    marker = as_tensor(Image.new("RGB", (1, 1), MARKER))[:, 0, 0]
    pixels, mirrored = dataset.load_pixels(0), dataset.load_pixels(0, flip=True)
    assert torch.equal(pixels[:, 5, 40 - 36], marker)
    # mirrored source column: 200 - 40 = 160; minus the flipped crop's left edge: 160 - 37 = 123 = 127 - 4
    assert torch.equal(mirrored[:, 5, 200 - 40 - 37], marker)
    assert int((pixels == marker[:, None, None]).all(0).sum()) == 1
    assert int((mirrored == marker[:, None, None]).all(0).sum()) == 1
