"""Writing captions for a folder of images, with any captioner: BLIP/GIT sentences or WD14 tags.

`caption_folder(folder, captioner, options)` captions the images in batches and writes `.txt` sidecars and/or
a `metadata.csv` (filename,prompt) atomically. By default an image that already has a caption is skipped, so a
caption the user wrote or edited is never clobbered. Unreadable images are reported in `CaptionReport`, never
fatal; bad options raise `CaptionError` with the fix. Images are opened with `lora_train.images` and caption
files read and written with `lora_train.captions_io`, as training reads them; an existing CSV is only rewritten
when it has exactly the two columns filename,prompt, so that no column is ever dropped.

A captioner is anything with the `ImageCaptioner` shape: `lora_train.captioning` (BLIP, GIT) and
`lora_train.tagger` (WD14 taggers) both are.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

from PIL import Image

from lora_train.captions_io import (CAPTION_COLUMNS, CSV_HEADER, FILENAME_COLUMNS, CaptionFileError,
                                    captions_from_table, read_csv_table, read_sidecar, split_tags,
                                    write_caption_csv, write_text_atomic)
from lora_train.images import find_images, probe_image, to_rgb

MODES = ("skip", "overwrite", "append")
SIDECAR_EXTENSION = ".txt"

ProgressCallback = Callable[[int, int], None]
StopFlag = Union[Callable[[], bool], threading.Event]


class CaptionError(ValueError):
    """A model, folder or option the user must fix; the message says how."""


class ImageCaptioner(Protocol):
    """What caption_folder needs from a captioning model."""

    family: str  # "blip", "git", "wd14"
    writes_tags: bool  # its captions are comma-separated tags: append adds only the tags a caption lacks
    empty_reason: str  # the report's reason for an image it gave no caption

    @property
    def batch_size(self) -> int: ...

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def caption(self, images: Sequence[Image.Image], batch_size: Optional[int] = None) -> List[str]: ...


@dataclass
class FolderOptions:
    recursive: bool = False  # also caption images in subfolders (hidden folders are never entered)
    write_txt: bool = True  # write <image stem>.txt sidecars
    csv_path: Optional[Path] = None  # also/instead write this metadata.csv (filenames relative to its folder)
    prefix: str = ""  # put before each generated caption as is, e.g. "sks style, "
    suffix: str = ""  # put after each generated caption as is
    mode: str = "skip"  # skip: keep existing captions; overwrite: replace them; append: existing + ", " + new

    def validate(self) -> None:
        if self.mode not in MODES:
            raise CaptionError(f"mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if not self.write_txt and self.csv_path is None:
            raise CaptionError("nothing to write: enable .txt sidecars or give a metadata.csv path")
        if self.csv_path is not None and not Path(self.csv_path).parent.is_dir():
            raise CaptionError(f"the folder of {str(self.csv_path)!r} does not exist; create it or fix the path")


@dataclass
class CaptionReport:
    captioned: int = 0
    skipped: int = 0  # images that already had a caption (mode skip)
    failed: List[Tuple[Path, str]] = field(default_factory=list)  # (image, why it got no caption)
    seconds: float = 0.0  # captioning time, model loading excluded
    images_per_s: float = 0.0
    stopped: bool = False  # the stop flag ended the run early

    def summary(self) -> str:
        lines = [f"captioned {self.captioned}, skipped {self.skipped} (already captioned), failed "
                 f"{len(self.failed)} in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s)"
                 + ("; stopped early" if self.stopped else "")]
        lines += [f"  failed: {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


def read_caption_csv(path: Path) -> Dict[str, str]:
    """{filename relative to the CSV's folder, / form: caption} in file order; {} when there is no file yet.

    Raises:
        CaptionError: the file is not UTF-8 CSV, or its header is not exactly two columns, filename then caption
            (it is rewritten as filename,prompt, so any other column would be lost).
    """
    if not path.is_file():
        return {}
    try:
        header, rows = read_csv_table(path)
    except CaptionFileError as error:
        raise CaptionError(str(error)) from None
    if not header and not rows:
        return {}
    if len(header) != 2 or header[0] not in FILENAME_COLUMNS or header[1] not in CAPTION_COLUMNS:
        raise CaptionError(f"{path} has the header {','.join(header)!r}; captions are written to a two-column "
                           f"{','.join(CSV_HEADER)} CSV: fix the header or write another CSV")
    return captions_from_table(path, header, rows)


def _csv_key(image: Path, csv_path: Path) -> str:
    """The image's filename as the CSV holds it: relative to the CSV's folder, with / separators."""
    return Path(os.path.relpath(image, csv_path.parent)).as_posix()


@dataclass
class _Run:
    """One caption_folder call: what it writes and what it found so far."""

    captioner: ImageCaptioner
    options: FolderOptions
    csv_rows: Optional[Dict[str, str]]  # the CSV's captions when writing one, read before the run
    report: CaptionReport = field(default_factory=CaptionReport)

    def existing(self, image: Path) -> str:
        """The image's caption: its sidecar, else its CSV row (when writing the CSV); "" when it has none.

        Raises:
            CaptionFileError: the sidecar cannot be read.
        """
        caption = read_sidecar(image.with_suffix(SIDECAR_EXTENSION))
        if not caption and self.csv_rows is not None:
            caption = self.csv_rows.get(_csv_key(image, Path(self.options.csv_path)), "")
        return caption

    def csv_can_name(self, image: Path) -> bool:
        """Whether the CSV can hold the image's name (a UTF-8 file; a name from a non-UTF-8 folder cannot be)."""
        try:
            _csv_key(image, Path(self.options.csv_path)).encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    def write(self, image: Path, caption: str) -> None:
        if self.options.write_txt:
            write_text_atomic(image.with_suffix(SIDECAR_EXTENSION), caption)
        if self.csv_rows is not None and self.csv_can_name(image):
            self.csv_rows[_csv_key(image, Path(self.options.csv_path))] = caption
        self.report.captioned += 1

    def save_csv(self) -> None:
        """Writes the CSV with every caption so far (atomically), so a crash later keeps them."""
        if self.csv_rows and self.report.captioned:
            write_caption_csv(Path(self.options.csv_path), self.csv_rows)


def _plan(run: _Run, images: List[Path]) -> List[Tuple[Path, str]]:
    """(image, caption to append to) for the images to caption now; the others are skipped or failed."""
    claimed: Dict[Path, Path] = {}
    jobs = []
    for image in images:
        sidecar = image.with_suffix(SIDECAR_EXTENSION)
        if run.options.write_txt and sidecar in claimed:
            run.report.failed.append((image, f"shares {sidecar.name} with {claimed[sidecar].name}; rename one"))
            continue
        if not run.options.write_txt and not run.csv_can_name(image):
            run.report.failed.append((image, "its path is not valid UTF-8, so metadata.csv cannot name it; rename "
                                             "the file or folder, or write .txt captions"))
            continue
        claimed[sidecar] = image
        try:
            existing = run.existing(image)
        except CaptionFileError as error:
            run.report.failed.append((image, f"{sidecar.name}: {error}"))
            continue
        if existing and run.options.mode == "skip":
            run.report.skipped += 1
        else:
            jobs.append((image, existing if run.options.mode == "append" else ""))
    return jobs


def _stop_requested(stop: Optional[StopFlag]) -> bool:
    if stop is None:
        return False
    return stop.is_set() if isinstance(stop, threading.Event) else bool(stop())


def _caption_batch(run: _Run, jobs: List[Tuple[Path, str]]) -> None:
    opened = []
    for path, existing in jobs:
        image, reason = probe_image(path)
        if image is None:
            run.report.failed.append((path, reason))
        else:
            opened.append((path, existing, to_rgb(image)))
    generated = run.captioner.caption([image for _, _, image in opened]) if opened else []
    for (path, existing, _), text in zip(opened, generated):
        if not text:
            run.report.failed.append((path, run.captioner.empty_reason))
            continue
        caption = run.options.prefix + text + run.options.suffix
        run.write(path, merge_caption(existing, caption, run.captioner.writes_tags))


def merge_caption(existing: str, caption: str, tags_only: bool) -> str:
    """The caption that append mode writes: existing + ", " + the new one (with tags_only, only the new tags
    that the existing caption lacks, compared case-insensitively)."""
    if not existing:
        return caption
    if tags_only:
        have = {tag.lower() for tag in split_tags(existing)}
        caption = ", ".join(tag for tag in split_tags(caption) if tag.lower() not in have)
    return f"{existing}, {caption}" if caption else existing


def caption_folder(folder: Union[str, Path], captioner: ImageCaptioner, options: Optional[FolderOptions] = None,
                   progress: Optional[ProgressCallback] = None, stop: Optional[StopFlag] = None) -> CaptionReport:
    """Captions the folder's images in batches of captioner.batch_size and writes the captions.

    `progress(done, total)` is called before the first batch and after each one (total: images to caption);
    `stop` (a callable or threading.Event) is checked before each batch. Captions done so far are always kept:
    sidecars are written per image, a metadata.csv after every batch.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptionError(f"{str(folder)!r} is not a folder; give the folder that holds the images")
    options = options or FolderOptions()
    options.validate()
    csv_path = Path(options.csv_path) if options.csv_path is not None else None
    run = _Run(captioner, options, read_caption_csv(csv_path) if csv_path else None)
    jobs = _plan(run, find_images(folder, options.recursive))
    if jobs:
        captioner.load()
    size, started = captioner.batch_size, time.perf_counter()
    if progress:
        progress(0, len(jobs))
    try:
        for start in range(0, len(jobs), size):
            if _stop_requested(stop):
                run.report.stopped = True
                break
            _caption_batch(run, jobs[start:start + size])
            if csv_path:
                run.save_csv()
            if progress:
                progress(min(start + size, len(jobs)), len(jobs))
    finally:
        if csv_path:
            run.save_csv()
    run.report.seconds = time.perf_counter() - started
    run.report.images_per_s = run.report.captioned / run.report.seconds if run.report.seconds > 0 else 0.0
    return run.report

