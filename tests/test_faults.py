"""Fault injection: full disks, refused names, read-only and file-shaped folders, damaged checkpoints, killed and
concurrent runs, interrupts and files that change mid-run. Each ends before the first step (or at the fault)
with one `error:` line, or trains and keeps what it trained.

A full disk is a small tmpfs where the machine lets us mount one (root with CAP_SYS_ADMIN), else a simulated
ENOSPC; a read-only folder is a read-only tmpfs, else a simulated EROFS (root ignores file permissions).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from lora_train import checkpoint, export
from lora_train.cli import main
from lora_train.models.diffusers import load_diffusers_model
from lora_train.pipeline import train_lora
from lora_train.save_plan import SaveFailedError, SavePlanError
from test_training import make_config, write_yaml

DISK_KIB = 8192  # room for the tiny LoRA and two of its checkpoints (about 2 MiB each)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_diffusers_model(str(tiny_checkpoint))


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@contextlib.contextmanager
def mounted(path: Path, options: str):
    """Yields whether a tmpfs with these options is mounted at path (unmounted afterwards)."""
    ok = _mount(path, options)
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], check=True)


class SmallDisk:
    """A folder on a small disk that `fill()` fills up: a real tmpfs, or ENOSPC simulated for writes into it."""

    def __init__(self, path: Path, real: bool, monkeypatch):
        self.path, self.real, self.monkeypatch = path, real, monkeypatch

    def fill(self) -> None:
        if self.real:
            with open(self.path / "filler", "wb") as file, contextlib.suppress(OSError):
                while True:
                    file.write(b"\0" * 65536)
                    file.flush()
            return
        def refuse(original):
            def write(*args):
                target = next(str(arg) for arg in args if isinstance(arg, (str, Path)))
                if target.startswith(str(self.path)):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
                return original(*args)
            return write
        self.monkeypatch.setattr(export, "_write_atomic", refuse(export._write_atomic))  # (path, data, overwrite)
        self.monkeypatch.setattr(checkpoint, "_write_tensors", refuse(checkpoint._write_tensors))  # (tensors, path)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    path = tmp_path / "disk"
    with mounted(path, f"size={DISK_KIB}k") as real:
        yield SmallDisk(path, real, monkeypatch)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A read-only folder: a read-only tmpfs, or EROFS simulated for creating anything inside it."""
    path = tmp_path / "read-only"
    with mounted(path, "ro,size=64k") as real:
        if not real:
            def refuse(original):
                def create(target, *args, **kwargs):
                    if str(target).startswith(str(path) + os.sep):
                        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
                    return original(target, *args, **kwargs)
                return create
            for name in ("open", "mkdir"):
                monkeypatch.setattr(os, name, refuse(getattr(os, name)))
        yield path


def fill_at_step(disk: SmallDisk, step: int):
    """A trainer callback filling the disk after `step`."""
    return lambda event, trainer: disk.fill() if event == "step" and trainer.position.step == step else None


class StepCounter:
    def __init__(self):
        self.steps = 0

    def __call__(self, event, trainer):
        self.steps += event == "step"


def run_cli(config, tmp_path, capsys):
    """(exit code, the last stderr line, stdout) of `train` on this config."""
    code = main(["train", "--config", write_yaml(config, tmp_path / "run.yaml")])
    captured = capsys.readouterr()
    return code, (captured.err.strip().splitlines() or [""])[-1], captured.out


# --- work lost at the save -----------------------------------------------------------------------------------


def test_a_disk_full_at_the_final_save_keeps_the_lora_in_the_checkpoint_folder(model, tiny_checkpoint,
                                                                                sample_images, small_disk, tmp_path):
    config = make_config(sample_images, tiny_checkpoint, small_disk.path, max_train_steps=2)
    config.output.checkpoint_dir = str(tmp_path / "checkpoints")
    filler = fill_at_step(small_disk, 2)
    with pytest.raises(SaveFailedError, match="could not be written to .*test_lora.safetensors") as raised:
        train_lora(config, model, callbacks=[filler])
    saved = raised.value.result.lora_path
    assert saved.parent == tmp_path / "checkpoints" and str(saved) in str(raised.value)
    assert raised.value.report["lora_fallback"] == str(saved) and raised.value.result.steps == 2
    assert len(load_file(str(saved))) > 0


def test_a_disk_full_at_a_checkpoint_goes_on_and_the_lora_lands_in_the_temp_folder(
        model, tiny_checkpoint, sample_images, small_disk, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-temp"))
    (tmp_path / "system-temp").mkdir()
    config = make_config(sample_images, tiny_checkpoint, small_disk.path, max_train_steps=4)
    config.output.save_steps = 2
    filler = fill_at_step(small_disk, 2)
    code = _cli_with_callback(config, tmp_path, filler)
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and str(tmp_path / "system-temp") in last, last
    assert "not written: checkpoint at step 2" in out and "training done: 4/4 steps" in out
    assert len(list((tmp_path / "system-temp").glob("test_lora-*.safetensors"))) == 1


def _cli_with_callback(config, tmp_path, callback):
    """The CLI, with one more trainer callback (as a user's Ctrl+C or a filling disk would act mid-run)."""
    import lora_train.pipeline as pipeline

    original = pipeline.TensorBoardLogger

    class WithCallback(original):
        def __call__(self, event, trainer):
            super().__call__(event, trainer)
            callback(event, trainer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "TensorBoardLogger", WithCallback)
        return main(["train", "--config", write_yaml(config, tmp_path / "run.yaml")])


def test_too_little_free_space_is_refused_before_the_first_step(model, tiny_checkpoint, sample_images, tmp_path):
    with mounted(tmp_path / "tiny-disk", "size=64k") as real:
        if not real:
            pytest.skip("no tmpfs here: free space cannot be made small")
        config = make_config(sample_images, tiny_checkpoint, tmp_path / "tiny-disk", max_train_steps=2)
        counter = StepCounter()
        with pytest.raises(SavePlanError, match=r"output.output_dir: the run will write about .* MiB are free"):
            train_lora(config, model, callbacks=[counter])
        assert counter.steps == 0


@pytest.mark.parametrize("name, expected", [
    ("n" * 300, r"output.output_name: 300 characters are too long .* use at most \d+ bytes"),
    ("bad\0name", "output.output_name: 'bad\\\\x00name' contains a NUL character; remove it"),
])
def test_a_name_the_file_system_refuses_ends_before_the_first_step(model, tiny_checkpoint, sample_images, tmp_path,
                                                                   capsys, name, expected):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=2)
    config.output.output_name = name
    code, last, out = run_cli(config, tmp_path, capsys)
    assert code == 2 and last.startswith("error: ") and out == "", "refused before training: no summary"
    assert re.search(expected, last), last


def test_a_folder_name_that_is_not_utf8_trains_and_is_escaped_in_the_metadata(model, tiny_checkpoint,
                                                                              sample_images, tmp_path):
    latin1 = os.path.join(os.fsencode(sample_images), "caf\xe9".encode("latin-1"))
    os.mkdir(latin1)
    for image in sorted(sample_images.glob("0[0-3]_*")):
        shutil.move(str(image), os.path.join(latin1, os.fsencode(image.name)))
    result = train_lora(make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=1), model)
    with safe_open(str(result.lora_path), "pt") as file:
        frequency = json.loads(file.metadata()["ss_tag_frequency"])
    assert set(frequency) == {"root", "caf\\xe9"}


def test_an_epoch_file_of_another_run_is_refused_before_the_first_step(model, tiny_checkpoint, sample_images,
                                                                       tmp_path):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", epochs=3)
    config.output.save_every_n_epochs = 1
    earlier = tmp_path / "out" / "test_lora-000002.safetensors"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier run's epoch file")
    counter = StepCounter()
    with pytest.raises(SavePlanError, match="test_lora-000002.safetensors already exists"):
        train_lora(config, model, callbacks=[counter])
    assert counter.steps == 0 and earlier.read_bytes() == b"an earlier run's epoch file"


def test_a_resume_after_a_kill_between_an_epoch_file_and_a_checkpoint_finishes(model, tiny_checkpoint,
                                                                               sample_images, tmp_path):
    def config(**training):
        made = make_config(sample_images, tiny_checkpoint, tmp_path / "out", epochs=3, **training)
        made.output.save_every_n_epochs, made.output.save_steps = 1, 3
        return made
    killed = lambda event, trainer: trainer.request_stop("discard") if trainer.position.step == 5 else None  # noqa
    assert train_lora(config(), model, callbacks=[killed]).state == "discarded"
    assert (tmp_path / "out" / "test_lora-000002.safetensors").is_file()  # written at step 4, after the checkpoint
    resumed = train_lora(config(resume_from_checkpoint=str(tmp_path / "out/checkpoints/test_lora-step000003")), model)
    assert resumed.state == "done" and resumed.steps == 6
    assert [path.name for path in resumed.epoch_files] == ["test_lora-000002.safetensors"]


# --- tracebacks instead of an answer ---------------------------------------------------------------------------


def _damage(folder: Path, damage: str) -> None:
    name, how = damage.split(":")
    path = folder / name
    if how == "missing":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes(b"" if how == "empty" else data[:len(data) // 2])


@pytest.fixture(scope="module")
def checkpoints(model, tiny_checkpoint, tmp_path_factory) -> Path:
    """The checkpoints folder of one 4-step run: test_lora-step000002 and test_lora-step000004."""
    from lora_train.cli_demo import make_sample_dataset

    out = tmp_path_factory.mktemp("checkpointed")
    config = make_config(make_sample_dataset(out / "images"), tiny_checkpoint, out, max_train_steps=4)
    config.output.save_steps = 2
    train_lora(config, model)
    return out / "checkpoints"


@pytest.mark.parametrize("damage", ["lora.safetensors:truncated", "lora.safetensors:empty",
                                    "optimizer.safetensors:missing", "state.json:truncated", "state.json:empty"])
def test_a_damaged_checkpoint_names_the_file_and_the_earlier_checkpoints(checkpoints, tiny_checkpoint,
                                                                         sample_images, tmp_path, capsys, damage):
    copy = shutil.copytree(checkpoints, tmp_path / "checkpoints")
    _damage(copy / "test_lora-step000004", damage)
    resume = make_config(sample_images, tiny_checkpoint, tmp_path / "b", max_train_steps=4,
                         resume_from_checkpoint=str(copy / "test_lora-step000004"))
    code, last, _ = run_cli(resume, tmp_path, capsys)
    assert code == 2 and last.startswith("error: the checkpoint test_lora-step000004 is damaged: ")
    assert damage.split(":")[0] in last and "test_lora-step000002" in last


def test_an_output_folder_that_is_a_file_ends_before_the_first_step(tiny_checkpoint, sample_images, tmp_path,
                                                                    capsys):
    (tmp_path / "out").write_text("not a folder")
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=2)
    code, last, _ = run_cli(config, tmp_path, capsys)
    assert code == 2 and last.startswith("error: output.output_dir: ") and "is a file, not a folder" in last


def test_a_read_only_output_folder_ends_before_the_first_step(tiny_checkpoint, sample_images, tmp_path, capsys,
                                                              read_only):
    config = make_config(sample_images, tiny_checkpoint, read_only, max_train_steps=2)
    config.output.logging_dir = str(tmp_path / "logs")
    code, last, _ = run_cli(config, tmp_path, capsys)
    assert code == 2 and last.startswith("error: output.output_dir: cannot write in ") and "Read-only" in last


@pytest.mark.parametrize("text, expected", [
    (b"data:\n  resolution: 512 # caf\xe9\n", "is not UTF-8 text (byte 0xe9 at line 2, column 24)"),
    (b"data:\n  resolution: [512\nmodel: {}\n", "is not valid YAML: line 3, column 6"),
])
def test_a_config_that_cannot_be_read_is_one_short_error(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_ctrl_c_while_the_model_loads_exits_130_without_a_traceback(tiny_checkpoint, sample_images, tmp_path,
                                                                    capsys, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt
    monkeypatch.setattr("lora_train.models.safetensors_file.read_header", interrupted)
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=2)
    code, last, _ = run_cli(config, tmp_path, capsys)
    assert code == 130 and last.startswith("interrupted: ") and "re-download" not in last


def test_a_second_ctrl_c_exits_130_without_a_traceback(tiny_checkpoint, sample_images, tmp_path, capsys):
    def press_twice(event, trainer):
        if event == "step" and trainer.position.step == 1:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=20)
    code = _cli_with_callback(config, tmp_path, press_twice)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "interrupted: stopped without saving" in err
    assert not config.output.lora_path.exists()


def test_an_image_deleted_mid_run_is_skipped_with_a_warning(model, tiny_checkpoint, sample_images, tmp_path,
                                                            caplog):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=6, cache_latents=False)
    victim = sorted(sample_images.glob("*.png"))[0]
    deleter = lambda event, trainer: victim.unlink() if event == "step" and trainer.position.step == 1 else None  # noqa
    result = train_lora(config, model, callbacks=[deleter])
    assert result.state == "done" and result.steps == 6
    assert any(victim.name in record.message and "skipped" in record.message for record in caplog.records)


# --- wrong results, silently ----------------------------------------------------------------------------------


def test_captions_longer_than_the_text_encoder_are_counted_in_one_warning(model, tiny_checkpoint, sample_images,
                                                                          tmp_path, caplog):
    long_one = sorted(sample_images.glob("*.txt"))[0]
    long_one.write_text(", ".join(f"tag{index}" for index in range(80)), encoding="utf-8")
    train_lora(make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=1), model)
    warnings = [record.message for record in caplog.records if "longer than the text encoder" in record.message]
    assert len(warnings) == 1 and warnings[0].startswith("1 of 8 images") and long_one.stem in warnings[0]
