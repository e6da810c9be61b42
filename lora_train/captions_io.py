"""Caption files on disk: the metadata.csv format and sidecar text files, read and written.

lora_train.dataset reads captions through this module and lora_train.captioning writes them, so both agree on one
format. A caption CSV is UTF-8 (a BOM is accepted) with a header row naming a filename column (filename,
file_name or image) and a caption column (prompt, text or caption); filenames are relative to the CSV's folder
and read back with / separators. `write_caption_csv` writes the two columns filename,prompt. A sidecar is a UTF-8
text file beside its image holding that image's caption. A caption is also a list of comma-separated tags
(`split_tags`); `count_tags` counts them as kohya's `ss_tag_frequency` does.

A file that cannot be used raises `CaptionFileError` with what to fix; callers turn it into their own error or
report. Writes go through a temp file and os.replace, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Tuple

FILENAME_COLUMNS = ("filename", "file_name", "image")
CAPTION_COLUMNS = ("prompt", "text", "caption")
CSV_HEADER = ("filename", "prompt")  # the header write_caption_csv writes


class CaptionFileError(ValueError):
    """A caption CSV or sidecar that cannot be read; the message says what to fix."""


def read_csv_table(path: Path) -> Tuple[List[str], List[List[str]]]:
    """(header cells stripped and lower-cased, the rows below it); ([], []) for an empty file.

    Raises:
        CaptionFileError: the file is not UTF-8 CSV.
    """
    try:
        with Path(path).open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise CaptionFileError(f"{path}: cannot be read as UTF-8 CSV ({error}); save it as UTF-8 CSV") from None
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    return header, rows[1:]


def captions_from_table(path: Path, header: List[str], rows: List[List[str]]) -> Dict[str, str]:
    """{filename in / form: stripped caption} from read_csv_table's result; the last row wins for a repeated file.

    Raises:
        CaptionFileError: the header names no filename column or no caption column (path names the file).
    """
    name_col = next((header.index(name) for name in FILENAME_COLUMNS if name in header), None)
    text_col = next((header.index(name) for name in CAPTION_COLUMNS if name in header), None)
    if name_col is None or text_col is None:
        raise CaptionFileError(
            f"{path}: the first row must name a filename column ({', '.join(FILENAME_COLUMNS)}) and a caption "
            f"column ({', '.join(CAPTION_COLUMNS)}); found {', '.join(header) or 'no header'}")
    captions = {}
    for row in rows:
        name = row[name_col].strip() if len(row) > name_col else ""
        if name:
            key = PurePosixPath(name.replace("\\", "/")).as_posix()
            captions[key] = row[text_col].strip() if len(row) > text_col else ""
    return captions


def read_metadata_csv(path: Path) -> Dict[str, str]:
    """{filename relative to the CSV's folder, in / form: stripped caption}; the last row wins for a repeated file.

    Raises:
        CaptionFileError: the file is not UTF-8 CSV or has no recognisable header row.
    """
    return captions_from_table(path, *read_csv_table(path))


def write_caption_csv(path: Path, captions: Dict[str, str]) -> None:
    """Writes a filename,prompt CSV (csv module quoting) atomically."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([CSV_HEADER, *captions.items()])
    write_text_atomic(path, text.getvalue())


def read_sidecar(path: Path) -> str:
    """The stripped caption in a sidecar text file; "" when there is no such file.

    Raises:
        CaptionFileError: the file is not UTF-8 text or cannot be read (the message does not name the file).
    """
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise CaptionFileError(f"caption is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    except OSError as error:
        raise CaptionFileError(f"caption cannot be read ({error.strerror}); fix its permissions") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Writes UTF-8 text through a temp file in the same folder and os.replace, so a reader never sees half."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def split_tags(caption: str) -> List[str]:
    """The caption's comma-separated tags, stripped, empty ones left out."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def count_tags(captions: Iterable[str]) -> Dict[str, int]:
    """{lower-cased tag: how often it occurs} over the captions, in first-seen order (ss_tag_frequency's counts)."""
    counts: Dict[str, int] = {}
    for caption in captions:
        for tag in split_tags(caption):
            counts[tag.lower()] = counts.get(tag.lower(), 0) + 1
    return counts
