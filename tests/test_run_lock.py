"""Two runs, one output name: the second is refused at its start naming the holder, a lock left by a killed
process is taken over, and checkpoints carry the run they belong to, so that one run never replaces another's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from lora_train import run_lock
from lora_train.models.diffusers import load_diffusers_model
from lora_train.pipeline import train_lora
from lora_train.save_plan import SavePlanError
from test_faults import StepCounter
from test_training import make_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_diffusers_model(str(tiny_checkpoint))


def test_a_second_run_into_the_same_name_is_refused_at_start_naming_the_holder(model, tiny_checkpoint,
                                                                               sample_images, tmp_path):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=2)
    (tmp_path / "out").mkdir()
    with run_lock.held(tmp_path / "out", "test_lora", run_id="1234"):
        counter = StepCounter()
        with pytest.raises(run_lock.RunLockedError, match=rf"process {os.getpid()} on .*run 1234"):
            train_lora(config, model, callbacks=[counter])
        assert counter.steps == 0
    assert train_lora(config, model).state == "done"


KILLED_RUN = """
import sys, time
from pathlib import Path
from lora_train import run_lock
with run_lock.held(Path(sys.argv[1]), "test_lora", run_id="4321"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_lock_left_by_a_killed_process_is_taken_over(model, tiny_checkpoint, sample_images, tmp_path, caplog):
    (tmp_path / "out").mkdir()
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path / "out")], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=1)
    with pytest.raises(run_lock.RunLockedError, match=f"process {process.pid} on .*run 4321"):
        train_lora(config, model)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    assert run_lock.lock_path(tmp_path / "out", "test_lora").is_file(), "the killed run left its lock file"
    assert train_lora(config, model).state == "done"
    assert any("taking over the lock of process" in record.message for record in caplog.records)


def test_checkpoints_are_tagged_with_their_run_and_another_runs_are_not_replaced(model, tiny_checkpoint,
                                                                                 sample_images, tmp_path):
    config = make_config(sample_images, tiny_checkpoint, tmp_path / "out", max_train_steps=2)
    config.output.save_steps = 2
    first = train_lora(config, model)
    state = json.loads((first.checkpoints[0] / "state.json").read_text())
    with safe_open(str(first.lora_path), "pt") as file:
        assert file.metadata()["ss_session_id"] == state["run"] != ""
    first.lora_path.unlink()  # as if the run had been killed before its final save
    with pytest.raises(SavePlanError, match="checkpoints of another run of this name .* resume that run"):
        train_lora(config, model)
    assert json.loads((first.checkpoints[0] / "state.json").read_text())["run"] == state["run"]


def test_a_check_passes_a_lock_nobody_holds_and_refuses_a_held_one_at_once(tmp_path):
    """A lock file nobody holds does not block a check (the API's), and a held one does."""
    run_lock.lock_path(tmp_path, "x").write_text(json.dumps({"pid": 1, "host": "h", "run": "9", "started": "t"}))
    run_lock.check_free(tmp_path, "x")
    with run_lock.held(tmp_path, "x", "5"):
        started = time.perf_counter()
        with pytest.raises(run_lock.RunLockedError, match="run 5"):
            run_lock.check_free(tmp_path, "x")
        assert time.perf_counter() - started < 1
