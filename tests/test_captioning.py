"""Auto-captioning: tiny random BLIP and GIT models built in code, loaded back from a local folder, no hub."""

from __future__ import annotations

import argparse
import csv
import gc
import os
import shutil
import threading
import weakref
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from lora_train import bench_caption, cli_caption  # noqa: E402
from lora_train.caption_writer import CaptionError, FolderOptions, caption_folder, read_caption_csv  # noqa: E402
from lora_train.captioning import CaptionOptions, create_captioner  # noqa: E402
from lora_train.captions_io import read_metadata_csv, write_text_atomic  # noqa: E402
from lora_train.images import open_rgb  # noqa: E402
from tiny_captioners import build_tiny_blip, build_tiny_git, write_images  # noqa: E402

NAMES = ["a.png", "b.jpg", "c.jpeg", "d.webp", "e.bmp", "f.png"]
GREEDY = {"num_beams": 1, "max_length": 20, "min_length": 5, "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from threads, and two threads on a busy 2-core runner can thrash."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"blip": build_tiny_blip(root / "blip"), "git": build_tiny_git(root / "git")}


@pytest.fixture(scope="module")
def blip(model_dirs: Dict[str, Path]):
    """The shared tiny BLIP, batch size 2, greedy."""
    return create_captioner(str(model_dirs["blip"]), CaptionOptions(batch_size=2, **GREEDY))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, NAMES)
    return folder


def sidecars(folder: Path) -> Dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))}


@pytest.mark.parametrize("family", ["blip", "git"])
def test_tiny_model_from_local_folder_captions_every_image(family, model_dirs, images):
    captioner = create_captioner(str(model_dirs[family]), CaptionOptions(**GREEDY))
    assert captioner.family == family and captioner.local
    captions = captioner.caption([open_rgb(path) for path in sorted(images.iterdir())])
    assert len(captions) == len(NAMES)
    assert all(isinstance(text, str) and text.strip() for text in captions)


@pytest.mark.parametrize("family", ["blip", "git"])
def test_batch_1_and_batch_4_give_identical_captions(family, model_dirs, images):
    captioner = create_captioner(str(model_dirs[family]), CaptionOptions(**GREEDY))
    pictures = [open_rgb(path) for path in sorted(images.iterdir())]
    single = captioner.caption(pictures, batch_size=1)
    assert captioner.caption(pictures, batch_size=4) == single
    assert len(set(single)) > 1, "the tiny model should caption different images differently"


def test_prompt_stays_in_blip_caption_and_is_stripped_from_git(model_dirs, images):
    pictures = [open_rgb(path) for path in sorted(images.iterdir())[:3]]
    options = CaptionOptions(prompt="a photo of", **GREEDY)
    blip_captions = create_captioner(str(model_dirs["blip"]), options).caption(pictures)
    git_captions = create_captioner(str(model_dirs["git"]), options).caption(pictures)
    assert all(text.startswith("a photo of ") for text in blip_captions)
    assert all(text and not text.startswith("a photo of") for text in git_captions)


def test_family_comes_from_config_not_folder_name(model_dirs, tmp_path):
    misleading = shutil.copytree(model_dirs["git"], tmp_path / "blip-image-captioning-large")
    assert create_captioner(str(misleading), CaptionOptions(**GREEDY)).family == "git"


def test_bad_model_raises_clear_error(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path / "bert")
    with pytest.raises(CaptionError, match="not a captioning model"):
        create_captioner(str(tmp_path / "bert"))
    with pytest.raises(CaptionError, match="does not exist"):
        create_captioner(str(tmp_path / "missing" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionError, match="no config.json"):
        create_captioner(str(tmp_path / "empty"))


@pytest.mark.parametrize("options, message", [
    ({"min_length": 30, "max_length": 20}, "exceeds max_length"),
    ({"num_beams": 0}, "num_beams"),
    ({"batch_size": 0}, "batch_size"),
    ({"device": "gpu"}, "use auto, cpu, cuda"),
    ({"dtype": "fp8"}, "dtype"),
])
def test_bad_options_raise_clear_error(options, message):
    with pytest.raises(CaptionError, match=message):
        CaptionOptions(**options).validate()


def test_fp16_on_cpu_is_refused(model_dirs):
    captioner = create_captioner(str(model_dirs["blip"]), CaptionOptions(device="cpu", dtype="fp16"))
    with pytest.raises(CaptionError, match="needs a CUDA device"):
        captioner.load()


def test_sidecars_with_prefix_and_suffix(blip, images):
    report = caption_folder(images, blip, FolderOptions(prefix="sks style, ", suffix=", best quality"))
    assert (report.captioned, report.skipped, report.failed, report.stopped) == (len(NAMES), 0, [], False)
    assert report.seconds > 0 and report.images_per_s > 0
    written = sidecars(images)
    assert sorted(written) == sorted(Path(name).stem + ".txt" for name in NAMES)
    for text in written.values():
        assert text.startswith("sks style, ") and text.endswith(", best quality") and len(text) > 25
    assert not [path for path in images.iterdir() if path.name.endswith(".tmp")]


def test_skip_keeps_an_edited_caption_then_overwrite_and_append(blip, images):
    caption_folder(images, blip)
    first = sidecars(images)
    (images / "a.txt").write_text("my own caption", encoding="utf-8")
    report = caption_folder(images, blip)
    assert (report.captioned, report.skipped) == (0, len(NAMES))
    assert sidecars(images) == dict(first, **{"a.txt": "my own caption"})

    report = caption_folder(images, blip, FolderOptions(mode="append"))
    assert report.captioned == len(NAMES)
    assert (images / "a.txt").read_text(encoding="utf-8") == f"my own caption, {first['a.txt']}"
    assert (images / "b.txt").read_text(encoding="utf-8") == f"{first['b.txt']}, {first['b.txt']}"

    report = caption_folder(images, blip, FolderOptions(mode="overwrite"))
    assert report.captioned == len(NAMES) and sidecars(images) == first


def test_empty_sidecar_counts_as_no_caption(blip, images):
    (images / "a.txt").write_text("  \n", encoding="utf-8")
    report = caption_folder(images, blip)
    assert report.captioned == len(NAMES) and (images / "a.txt").read_text(encoding="utf-8").strip()


def test_corrupt_and_non_image_files_are_reported_not_fatal(blip, images):
    good = (images / "a.png").read_bytes()
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    (images / "text.jpg").write_text("not an image", encoding="utf-8")
    (images / "empty.webp").write_bytes(b"")
    (images / "notes.md").write_text("ignored: not an image extension", encoding="utf-8")
    report = caption_folder(images, blip)
    assert report.captioned == len(NAMES)
    reasons = {path.name: reason for path, reason in report.failed}
    assert sorted(reasons) == ["empty.webp", "text.jpg", "truncated.png"]
    assert "truncated" in reasons["truncated.png"] and "recognised image format" in reasons["text.jpg"]
    assert "0 bytes" in reasons["empty.webp"]
    assert not (images / "truncated.txt").exists() and "failed: " in report.summary()


def test_images_sharing_a_sidecar_are_reported(blip, tmp_path):
    write_images(tmp_path, ["x.png", "x.jpg"])
    report = caption_folder(tmp_path, blip)
    assert report.captioned == 1
    assert [(path.name, reason) for path, reason in report.failed] == [("x.png", "shares x.txt with x.jpg; rename one")]


def test_recursive_skips_hidden_folders(blip, tmp_path):
    write_images(tmp_path, ["top.png", "sub/deep.png", ".cache/hidden.png"])
    assert caption_folder(tmp_path, blip).captioned == 1
    report = caption_folder(tmp_path, blip, FolderOptions(recursive=True))
    assert report.captioned == 1 and report.skipped == 1
    assert (tmp_path / "sub" / "deep.txt").is_file() and not (tmp_path / ".cache" / "hidden.txt").exists()


def test_csv_preserves_other_rows_skips_existing_and_quotes(blip, images):
    csv_path = images / "metadata.csv"
    csv_path.write_text('filename,prompt\nold/gone.png,"kept, as is"\na.png,"user ""edited"", caption"\n',
                        encoding="utf-8")
    report = caption_folder(images, blip, FolderOptions(write_txt=False, csv_path=csv_path, prefix="sks, "))
    assert (report.captioned, report.skipped) == (len(NAMES) - 1, 1)
    assert not list(images.glob("*.txt"))
    with csv_path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["filename", "prompt"]
    assert rows[1:3] == [["old/gone.png", "kept, as is"], ["a.png", 'user "edited", caption']]
    assert sorted(row[0] for row in rows[3:]) == sorted(NAMES[1:])
    assert all(row[1].startswith("sks, ") for row in rows[3:])
    assert read_caption_csv(csv_path)["a.png"] == 'user "edited", caption'


def test_csv_elsewhere_gets_paths_relative_to_its_folder(blip, tmp_path):
    write_images(tmp_path / "data" / "set", ["one.png"])
    csv_path = tmp_path / "data" / "metadata.csv"
    caption_folder(tmp_path / "data" / "set", blip, FolderOptions(write_txt=False, csv_path=csv_path))
    assert list(read_caption_csv(csv_path)) == ["set/one.png"]


def test_csv_with_unknown_header_is_refused(blip, images):
    csv_path = images / "metadata.csv"
    csv_path.write_text("image,caption,score\na.png,x,1\n", encoding="utf-8")
    with pytest.raises(CaptionError, match="filename,prompt"):
        caption_folder(images, blip, FolderOptions(write_txt=False, csv_path=csv_path))
    assert csv_path.read_text(encoding="utf-8") == "image,caption,score\na.png,x,1\n"


def test_csv_round_trips_through_the_dataset_reader(blip, images):
    dataset = pytest.importorskip("lora_train.dataset", reason="lora_train.dataset is not written yet")
    from lora_train.config import DataConfig

    csv_path = images / "metadata.csv"
    caption_folder(images, blip, FolderOptions(write_txt=False, csv_path=csv_path, prefix='sks, "q", '))
    ours = read_caption_csv(csv_path)
    assert read_metadata_csv(csv_path) == ours and len(ours) == len(NAMES)
    loaded = dataset.load_dataset(DataConfig(train_data_dir=str(images), metadata_path=str(csv_path)))
    assert {sample.path.name: sample.caption for sample in loaded.samples} == ours


def test_progress_and_stop_flag_between_batches(blip, images):
    calls: List[tuple] = []
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if done >= 2:
            stop.set()

    report = caption_folder(images, blip, progress=progress, stop=stop)
    assert report.stopped and report.captioned == 2 and len(list(images.glob("*.txt"))) == 2
    assert calls == [(0, len(NAMES)), (2, len(NAMES))]

    calls.clear()
    report = caption_folder(images, blip, progress=progress, stop=lambda: False)
    assert not report.stopped and report.captioned == len(NAMES) - 2 and report.skipped == 2
    assert calls == [(0, 4), (2, 4), (4, 4)]


def test_exif_orientation_and_rgb(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.new("RGB", (40, 20), "red").save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (8, 8), 128).save(tmp_path / "grey.png")
    assert open_rgb(tmp_path / "rotated.jpg").size == (20, 40)
    clear = open_rgb(tmp_path / "clear.png")
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(tmp_path / "grey.png").mode == "RGB"


def test_atomic_write_leaves_no_temp_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old", encoding="utf-8")

    def refuse(source: str, destination: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text(encoding="utf-8") == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_unload_frees_the_model_and_next_call_reloads(model_dirs, images):
    captioner = create_captioner(str(model_dirs["blip"]), CaptionOptions(**GREEDY))
    pictures = [open_rgb(path) for path in sorted(images.iterdir())[:2]]
    before = captioner.caption(pictures)
    model = weakref.ref(captioner.model)
    captioner.unload()
    gc.collect()
    assert model() is None and not captioner.loaded and captioner.processor is None
    assert captioner.caption(pictures) == before and captioner.loaded


def test_an_empty_generated_caption_is_reported(model_dirs, images, monkeypatch):
    captioner = create_captioner(str(model_dirs["blip"]), CaptionOptions(batch_size=8, **GREEDY))
    monkeypatch.setattr(captioner, "caption", lambda pictures: ["", *["words"] * (len(pictures) - 1)])
    report = caption_folder(images, captioner)
    assert report.captioned == len(NAMES) - 1
    assert [(path.name, reason) for path, reason in report.failed] == [
        ("a.png", "the model generated an empty caption")]
    assert not (images / "a.txt").exists()


def test_folder_errors_are_clear(blip, tmp_path):
    with pytest.raises(CaptionError, match="is not a folder"):
        caption_folder(tmp_path / "missing", blip)
    with pytest.raises(CaptionError, match="mode 'replace' is unknown"):
        caption_folder(tmp_path, blip, FolderOptions(mode="replace"))
    with pytest.raises(CaptionError, match="nothing to write"):
        caption_folder(tmp_path, blip, FolderOptions(write_txt=False))


def parse(module, argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    return parser.parse_args(["caption", *argv])


def test_cli_writes_csv_with_prefix(model_dirs, images, capsys):
    output = images / "metadata.csv"
    args = parse(cli_caption, ["--input", str(images), "--output", str(output), "--model", str(model_dirs["blip"]),
                               "--prefix", "sks style, ", "--beams", "1", "--batch-size", "4", "--device", "cpu"])
    assert args.func(args) == 0
    captions = read_caption_csv(output)
    assert sorted(captions) == sorted(NAMES) and all(text.startswith("sks style, ") for text in captions.values())
    assert f"captioned {len(NAMES)}, skipped 0" in capsys.readouterr().out


def test_cli_output_folder_means_metadata_csv_in_it(model_dirs, images, tmp_path):
    args = parse(cli_caption, ["--input", str(images), "--output", str(tmp_path), "--model", str(model_dirs["blip"]),
                               "--beams", "1", "--max-length", "12", "--device", "cpu"])
    assert args.func(args) == 0
    assert sorted(read_caption_csv(tmp_path / "metadata.csv")) == sorted(f"images/{name}" for name in NAMES)


def test_cli_writes_sidecars_without_output(model_dirs, images):
    args = parse(cli_caption, ["--input", str(images), "--model", str(model_dirs["git"]), "--suffix", ", x",
                               "--max-length", "12", "--min-length", "3", "--device", "cpu", "--recursive"])
    assert args.func(args) == 0
    assert len(sidecars(images)) == len(NAMES) and all(text.endswith(", x") for text in sidecars(images).values())


@pytest.mark.parametrize("argv, message", [
    (["--input", "{tmp}/missing"], "--input"),
    (["--input", "{tmp}", "--output", "{tmp}/captions.json"], "not a .csv path"),
    (["--input", "{tmp}", "--model", "{tmp}/no/such/model"], "does not exist"),
    (["--input", "{tmp}", "--beams", "0"], "num_beams"),
    (["--input", "{tmp}", "--output", "{tmp}/no/such/dir/metadata.csv"], "does not exist"),
])
def test_cli_user_mistakes_exit_non_zero_with_one_line(argv, message, tmp_path, capsys):
    args = parse(cli_caption, [part.format(tmp=tmp_path) for part in argv])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_model_that_cannot_load_exits_2_with_one_line_saying_what_to_give(images, capsys):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported before HF_HUB_OFFLINE=1 was set; this test must not go online")
    args = parse(cli_caption, ["--input", str(images), "--model", "Salesforce/blip-image-captioning-base"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and not list(images.glob("*.txt"))
    assert "give a local model folder" in err


def test_cli_cuda_without_gpu_exits_2_with_one_line(model_dirs, images, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    args = parse(cli_caption, ["--input", str(images), "--model", str(model_dirs["blip"]), "--device", "cuda"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sees no CUDA GPU" in err


def test_bench_runs_on_the_tiny_model(capsys):
    args = parse(bench_caption, ["--images", "3", "--batch-sizes", "1,2", "--device", "cpu"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(blip) on cpu" in lines[0] and lines[1].split()[:2] == ["batch", "images/s"]
    assert [line.split()[0] for line in lines[2:]] == ["1", "2"] and lines[2].endswith("1.00x")


def test_bench_rejects_bad_batch_sizes(capsys):
    args = parse(bench_caption, ["--batch-sizes", "1,eight"])
    assert args.func(args) == 2 and "use e.g. 1,8" in capsys.readouterr().err
