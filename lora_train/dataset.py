"""Training images: scan a folder once, pair every image with its caption and bucket, and load it as a tensor.

`load_dataset(config)` walks `DataConfig.train_data_dir` recursively. Every .jpg/.jpeg/.png/.webp/.bmp file is
fully decoded once (EXIF orientation applied) so that broken files are found before training, not mid-run. A
subfolder named `N_name` (kohya convention, e.g. `10_mychar`) gives its images N repeats per epoch; the nearest
such folder wins, other images get `DataConfig.repeats`.

Captions come from a sidecar file `<stem><caption_extension>` and/or a CSV (`metadata_path`, else
`<train_data_dir>/metadata.csv`) with a filename column (filename, file_name or image) and a caption column
(prompt, text or caption), filenames relative to the CSV's folder. **The sidecar wins over the CSV row for the
same image**; an empty sidecar counts as no sidecar. An image with no caption is kept with an empty caption.
Caption files are read with `lora_train.captions_io` and images opened with `lora_train.images`, the same
modules auto-captioning (`lora_train.captioning`) writes and reads them with.

Images go to kohya-style aspect-ratio buckets (or one square when bucketing is off); `Dataset` hands out
single-bucket batches per epoch, pixels resized to cover the bucket and centre-cropped, each sample's original
size and crop offset (SDXL conditions on them), and captions with shuffling and dropout applied.

Nothing odd stops a run: unreadable or unsupported files, captionless images and CSV rows naming no usable image
go into `DatasetReport`, as do CSV rows repeating a file (the last row is used). `DatasetError` is raised only
when nothing usable is left: no usable image, no folder, no bucket that fits the resolution settings, or a CSV
that cannot be read. Source files are only read, never written.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from lora_train.captions_io import (CaptionFileError, captions_from_table, count_tags, read_csv_table, read_sidecar,
                                   split_tags)
from lora_train.config import DataConfig
from lora_train.images import IMAGE_EXTENSIONS, open_rgb, probe_image, walk_files
from lora_train.models import SizeInfo

IGNORED_EXTENSIONS = (".txt", ".csv", ".json", ".yaml", ".yml", ".npz", ".safetensors")
DEFAULT_CSV_NAME = "metadata.csv"
BUCKET_STEP = 64
SUMMARY_LIST_LIMIT = 20
REPEAT_FOLDER = re.compile(r"^(\d+)_.+")

Bucket = Tuple[int, int]


class DatasetError(ValueError):
    """The images or captions cannot be used at all; the message says what to fix."""


@dataclass
class Sample:
    """One usable image."""
    path: Path
    caption: str  # raw caption, before shuffling and dropout
    bucket: Bucket  # (width, height)
    repeats: int
    folder: str  # subfolder relative to train_data_dir, "" for the top level
    size: Tuple[int, int] = (0, 0)  # (width, height) of the source image, EXIF orientation applied


@dataclass
class DatasetReport:
    """What the scan found and every file or row it could not use."""
    images_found: int  # usable images
    skipped: List[Tuple[str, str]]  # (path relative to train_data_dir, reason)
    missing_captions: List[str]  # relative paths of images trained with an empty caption
    csv_rows_without_image: List[str]  # CSV filenames naming a missing or unusable image
    caption_source: str  # "sidecar .txt", "metadata.csv", "sidecar .txt + metadata.csv" or "none"
    csv_duplicates: List[str] = field(default_factory=list)  # "name (N rows)": files the CSV names more than once

    def summary(self) -> str:
        lines = [
            f"{self.images_found} usable images; captions from {self.caption_source}",
            f"{len(self.skipped)} files skipped, {len(self.missing_captions)} images without a caption, "
            f"{len(self.csv_rows_without_image)} CSV rows without an image",
        ]
        lines += _capped("Skipped:", [f"{path}: {reason}" for path, reason in self.skipped])
        lines += _capped("Without a caption (trained with an empty one):", self.missing_captions)
        lines += _capped("CSV rows naming no usable image:", self.csv_rows_without_image)
        lines += _capped("Files named in more than one CSV row (the last row's caption is used):",
                         self.csv_duplicates)
        return "\n".join(lines)


def _capped(title: str, items: List[str]) -> List[str]:
    if not items:
        return []
    lines = [title] + [f"  {item}" for item in items[:SUMMARY_LIST_LIMIT]]
    if len(items) > SUMMARY_LIST_LIMIT:
        lines.append(f"  ... and {len(items) - SUMMARY_LIST_LIMIT} more")
    return lines


@dataclass
class _Found:
    """An image file found by the scan, before it is decoded."""
    path: Path
    rel: str
    folder: str
    repeats: int


@dataclass
class Dataset:
    """The usable images of one training folder and how to serve them per epoch."""
    samples: List[Sample]
    report: DatasetReport
    config: DataConfig

    def bucket_counts(self) -> Dict[Bucket, int]:
        """Images per bucket, repeats included."""
        counts: Counter = Counter()
        for sample in self.samples:
            counts[sample.bucket] += sample.repeats
        return dict(sorted(counts.items()))

    def epoch_batches(self, batch_size: int, epoch: int, seed: int) -> List[List[int]]:
        """Indices into samples, batched one bucket at a time, in an order fixed by (seed, epoch)."""
        _check_batch_size(batch_size)
        rng = random.Random(f"{seed}/{epoch}")
        by_bucket: Dict[Bucket, List[int]] = {}
        for index, sample in enumerate(self.samples):
            by_bucket.setdefault(sample.bucket, []).extend([index] * sample.repeats)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches.extend(indices[start:start + batch_size] for start in range(0, len(indices), batch_size))
        rng.shuffle(batches)
        return batches

    def steps_per_epoch(self, batch_size: int) -> int:
        _check_batch_size(batch_size)
        return sum(math.ceil(count / batch_size) for count in self.bucket_counts().values())

    def load_pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        """The image resized to cover its bucket and centre-cropped: float32 [3, H, W] in [-1, 1]."""
        sample = self.samples[index]
        fitted = _cover_crop(open_rgb(sample.path), sample.bucket)
        if flip:
            fitted = ImageOps.mirror(fitted)
        array = np.asarray(fitted, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def size_info(self, index: int, flip: bool = False) -> SizeInfo:
        """The sample's original size, crop offset and target size, as SDXL's size conditioning takes them.

        The crop offset is in the resized image, as `load_pixels` crops it; a flip mirrors its left edge.
        """
        sample = self.samples[index]
        (width, height), ((resized_width, _), (left, top)) = sample.bucket, _cover_geometry(sample.size, sample.bucket)
        if flip:
            left = resized_width - width - left
        return SizeInfo(original=(sample.size[1], sample.size[0]), crop_top_left=(top, left), target=(height, width))

    def caption_for(self, index: int, rng: random.Random) -> str:
        """The caption to train on: dropped to "" with caption_dropout, else tags shuffled after keep_tokens."""
        caption = self.samples[index].caption
        if self.config.caption_dropout > 0 and rng.random() < self.config.caption_dropout:
            return ""
        if not self.config.shuffle_captions:
            return caption
        tags = split_tags(caption)
        kept, rest = tags[:self.config.keep_tokens], tags[self.config.keep_tokens:]
        rng.shuffle(rest)
        return ", ".join(kept + rest)

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        """{folder or "root": {lower-cased tag: images with it}}, like kohya's ss_tag_frequency."""
        captions: Dict[str, List[str]] = {}
        for sample in self.samples:
            captions.setdefault(sample.folder or "root", []).append(sample.caption)
        return {folder: count_tags(texts) for folder, texts in captions.items()}


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _cover_geometry(size: Tuple[int, int], bucket: Bucket) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((width, height) resized to cover the bucket, (left, top) of the centred bucket-sized crop in it)."""
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    return resized, ((resized[0] - width) // 2, (resized[1] - height) // 2)


def _cover_crop(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Lanczos-resizes the image until it covers the bucket, then crops the centre to exactly the bucket."""
    resized, (left, top) = _cover_geometry(image.size, bucket)
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    return image.crop((left, top, left + bucket[0], top + bucket[1]))


def make_buckets(resolution: int, min_reso: int, max_reso: int) -> List[Bucket]:
    """kohya's buckets: sides multiples of 64 in [min_reso, max_reso], area <= resolution**2, tallest per width."""
    low = -(-min_reso // BUCKET_STEP) * BUCKET_STEP
    high = max_reso // BUCKET_STEP * BUCKET_STEP
    buckets = set()
    for width in range(low, high + 1, BUCKET_STEP):
        height = min(high, resolution * resolution // width // BUCKET_STEP * BUCKET_STEP)
        if height >= low:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def nearest_bucket(size: Tuple[int, int], buckets: List[Bucket]) -> Bucket:
    """The bucket whose width/height ratio is closest to the image's; ties go to the larger area."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda bucket: (abs(bucket[0] / bucket[1] - ratio), -bucket[0] * bucket[1]))


def _walk_files(root: Path, skipped: List[Tuple[str, str]]) -> List[Path]:
    """Every visible file under root, sorted; hidden folders are not entered, unreadable ones are reported."""
    def report(error: OSError) -> None:
        skipped.append((_relative(Path(error.filename), root), f"folder cannot be read: {error.strerror}"))

    return walk_files(root, recursive=True, onerror=report)


def _relative(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return "" if rel == "." else rel


def _folder_repeats(folder: str, default: int) -> int:
    """Repeats from the nearest `N_name` folder in the relative folder path, else the default."""
    for part in reversed(PurePosixPath(folder).parts):
        match = REPEAT_FOLDER.match(part)
        if match:
            return int(match.group(1))
    return default


def _scan(root: Path, config: DataConfig, skipped: List[Tuple[str, str]]) -> List[_Found]:
    ignored = set(IGNORED_EXTENSIONS) | {config.caption_extension.lower()}
    found = []
    for path in _walk_files(root, skipped):
        rel, suffix = _relative(path, root), path.suffix.lower()
        if suffix in ignored:
            continue
        if suffix not in IMAGE_EXTENSIONS:
            skipped.append((rel, f"not a supported image type: {suffix or '(no extension)'}"))
            continue
        folder = _relative(path.parent, root)
        repeats = _folder_repeats(folder, config.repeats)
        if repeats < 1:
            skipped.append((rel, "0 repeats: its folder name starts with 0_; rename it to 1_... to use it"))
            continue
        found.append(_Found(path, rel, folder, repeats))
    return found


def _read_sidecar(found: _Found, extension: str, skipped: List[Tuple[str, str]]) -> str:
    """The stripped sidecar caption, or "" when there is none; an unreadable one is reported."""
    try:
        return read_sidecar(found.path.with_suffix(extension))
    except CaptionFileError as error:
        skipped.append((PurePosixPath(found.rel).with_suffix(extension).as_posix(), str(error)))
        return ""


def _metadata_path(config: DataConfig) -> Optional[Path]:
    if config.metadata_path:
        path = Path(config.metadata_path)
        if not path.is_file():
            raise DatasetError(f"metadata_path {str(path)!r} does not exist; fix the path or remove the key")
        return path
    default = Path(config.train_data_dir) / DEFAULT_CSV_NAME
    return default if default.is_file() else None


def _csv_rows(csv_path: Optional[Path]) -> Tuple[Dict[Path, Tuple[str, str]], List[str]]:
    """({resolved image path: (filename as written, caption)}, ["name (N rows)" per repeated file]) from the CSV;
    empty without one.

    Raises:
        DatasetError: the file is not UTF-8 CSV or has no recognisable header row.
    """
    if csv_path is None:
        return {}, []
    try:
        header, table = read_csv_table(csv_path)
        captions = captions_from_table(csv_path, header, table)
        per_file = Counter(name for row in table for name in captions_from_table(csv_path, header, [row]))
    except CaptionFileError as error:
        raise DatasetError(str(error)) from None
    repeated = sorted(f"{name} ({count} rows)" for name, count in per_file.items() if count > 1)
    return {(csv_path.parent / name).resolve(): (name, caption) for name, caption in captions.items()}, repeated


def _assign_captions(images: List[_Found], config: DataConfig, csv_name: str, rows: Dict[Path, Tuple[str, str]],
                     skipped: List[Tuple[str, str]]) -> Tuple[List[str], DatasetReport]:
    """One caption per image (sidecar, else CSV row, else "") and the report on the usable images."""
    sidecar_label = f"sidecar {config.caption_extension}"
    used, captions, missing = set(), [], []
    for image in images:
        caption = _read_sidecar(image, config.caption_extension, skipped)
        if caption:
            used.add(sidecar_label)
        row = rows.pop(image.path.resolve(), None)
        if not caption and row and row[1]:
            caption = row[1]
            used.add(csv_name)
        if not caption:
            missing.append(image.rel)
        captions.append(caption)
    sources = [label for label in (sidecar_label, csv_name) if label in used]
    report = DatasetReport(len(images), sorted(skipped), missing, sorted(name for name, _ in rows.values()),
                           " + ".join(sources) or "none")
    return captions, report


def _no_usable_image(root: Path, skipped: List[Tuple[str, str]]) -> DatasetError:
    supported = ", ".join(IMAGE_EXTENSIONS)
    if not skipped:
        return DatasetError(f"no images in {root}: add {supported} files (subfolders count too)")
    kinds = Counter(reason.split(":")[0] for _, reason in skipped)
    detail = "; ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    return DatasetError(f"no usable image in {root}: {len(skipped)} files skipped ({detail}); "
                        f"add {supported} images that open in an image viewer, or re-save the broken ones")


def _buckets_for(config: DataConfig) -> List[Bucket]:
    if not config.enable_bucket:
        return [(config.resolution, config.resolution)]
    low, high = config.bucket_range
    buckets = make_buckets(config.resolution, low, high)
    if not buckets:
        below = (f"resolution {config.resolution} is below the smallest bucket size ({low})"
                 if config.resolution < low else f"no bucket has both sides in [{low}, {high}] and an area within "
                 f"{config.resolution} x {config.resolution}")
        raise DatasetError(f"data.min_bucket_reso: {below}: lower data.min_bucket_reso to at most data.resolution "
                           "(or leave it empty: it follows the resolution)")
    return buckets


def load_dataset(config: DataConfig) -> Dataset:
    """Scans config.train_data_dir and returns every usable image with its caption, bucket and repeats.

    Raises:
        DatasetError: the folder is missing, no bucket fits the resolution settings, the CSV cannot be read, or
            no usable image is left.
    """
    root = Path(config.train_data_dir)
    if not root.is_dir():
        raise DatasetError(f"train_data_dir {str(root)!r} is not a folder; point it at the folder of images")
    buckets = _buckets_for(config)
    csv_path = _metadata_path(config)
    csv_rows, repeated = _csv_rows(csv_path)  # before the slow image scan, so that a broken CSV fails fast
    skipped: List[Tuple[str, str]] = []
    usable, sizes = [], []
    for found in _scan(root, config, skipped):
        image, reason = probe_image(found.path)
        if image is None:
            skipped.append((found.rel, reason))
        else:
            usable.append(found)
            sizes.append(image.size)
    if not usable:
        raise _no_usable_image(root, skipped)
    captions, report = _assign_captions(usable, config, csv_path.name if csv_path else "", csv_rows, skipped)
    report.csv_duplicates = repeated
    samples = [Sample(found.path, caption, nearest_bucket(size, buckets), found.repeats, found.folder, size)
               for found, size, caption in zip(usable, sizes, captions)]
    return Dataset(samples, report, config)

