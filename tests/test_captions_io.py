"""Tests for lora_train.captions_io: the caption CSV and sidecar formats shared by training and auto-captioning."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_train.captions_io import (CaptionFileError, read_csv_table, read_metadata_csv, read_sidecar,
                                    write_caption_csv)


def test_written_csv_reads_back_with_quotes_commas_and_slashes(tmp_path: Path):
    captions = {"a.png": 'sks, "quoted", caption', "sub/b.jpg": "line one", "c.webp": ""}
    write_caption_csv(tmp_path / "metadata.csv", captions)
    assert read_csv_table(tmp_path / "metadata.csv")[0] == ["filename", "prompt"]
    assert read_metadata_csv(tmp_path / "metadata.csv") == captions
    assert [path.name for path in tmp_path.iterdir()] == ["metadata.csv"]


def test_csv_columns_in_any_order_backslashes_and_repeated_rows(tmp_path: Path):
    (tmp_path / "m.csv").write_text(" Caption ,score,IMAGE\nfirst,1,sub\\a.png\n,2,\nlast,3,sub/a.png\n",
                                    encoding="utf-8")
    assert read_metadata_csv(tmp_path / "m.csv") == {"sub/a.png": "last"}


@pytest.mark.parametrize("data, message", [
    ("filename,prompt\na.png,caf\u00e9\n".encode("cp1252"), "save it as UTF-8 CSV"),
    (b"a.png,some caption\n", "must name a filename column"),
    (b"", "found no header"),
])
def test_unusable_csv_raises_caption_file_error_naming_the_file(tmp_path: Path, data: bytes, message: str):
    (tmp_path / "m.csv").write_bytes(data)
    with pytest.raises(CaptionFileError, match=message) as error:
        read_metadata_csv(tmp_path / "m.csv")
    assert str(tmp_path / "m.csv") in str(error.value) and isinstance(error.value, ValueError)


def test_sidecar_is_stripped_and_missing_means_empty(tmp_path: Path):
    (tmp_path / "a.txt").write_text("\ufeff  tagged, caption \n", encoding="utf-8")
    assert read_sidecar(tmp_path / "a.txt") == "tagged, caption"
    assert read_sidecar(tmp_path / "missing.txt") == ""


def test_non_utf8_sidecar_raises_with_the_fix(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(CaptionFileError, match=r"^caption is not UTF-8 text .*; save it as UTF-8$"):
        read_sidecar(tmp_path / "a.txt")
