"""Image files on disk: which files are images, finding them in a folder, and opening them upright in RGB.

lora_train.dataset (training) and lora_train.captioning (auto-captioning) both go through this module, so they
accept the same files, give a broken file the same reason and see the same pixels: fully decoded, EXIF
orientation applied, transparency composited on white, high-bit-depth greyscale (16-bit PNGs open as mode I or
I;16) and float images scaled to 8 bits rather than clipped to white. Hidden files and folders (name starting
with ".") are never listed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
FULL_SCALE = {"I": 65535, "I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "F": 1.0}  # white


def walk_files(folder: Path, recursive: bool = True,
               onerror: Optional[Callable[[OSError], None]] = None) -> List[Path]:
    """Every visible file in folder (and its visible subfolders when recursive), sorted.

    A folder that cannot be listed is passed to onerror, or left out silently without one.
    """
    found = []
    for root, dirnames, filenames in os.walk(folder, onerror=onerror):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith(".")) if recursive else []
        found.extend(Path(root) / name for name in filenames if not name.startswith("."))
    return sorted(found)


def find_images(folder: Path, recursive: bool = False) -> List[Path]:
    """Sorted image files (by extension) in folder; hidden files and folders are left out."""
    return [path for path in walk_files(folder, recursive) if path.suffix.lower() in IMAGE_EXTENSIONS]


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A greyscale image of 16 or 32 bits (ints up to 65535, as 16-bit PNGs open) or floats (0..1) as mode L.

    Pillow's convert() clips such values to 255, so every grey above 1/256 would turn white.
    """
    if image.mode not in FULL_SCALE:
        return image
    values = np.asarray(image, dtype=np.float64) * (255.0 / FULL_SCALE[image.mode])
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; anything with transparency is composited on white, high-bit-depth grey scaled to 8 bits."""
    image = _to_8_bit(image)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_upright(path: Path) -> Image.Image:
    """The fully decoded image with its EXIF orientation applied, in its own mode; the file is closed."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def open_rgb(path: Path) -> Image.Image:
    """The image upright (EXIF orientation applied) in RGB, transparency flattened onto white."""
    return to_rgb(open_upright(path))


def probe_image(path: Path) -> Tuple[Optional[Image.Image], str]:
    """(the upright image after a full decode, "") or (None, why the file cannot be used as an image)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file: 0 bytes"
        image = open_upright(path)
    except UnidentifiedImageError:
        return None, "unreadable image: not in a recognised image format"
    except DECODE_ERRORS as error:
        return None, f"unreadable image: {error}"
    if 0 in image.size:
        return None, "unreadable image: it has no pixels"
    return image, ""
