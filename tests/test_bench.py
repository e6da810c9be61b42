"""`python -m lora_train bench train` on the tiny model: three rows (floor, ours, reference) and both ratios."""

from __future__ import annotations

import re

import pytest

from lora_train.cli import main

ROW = r"^{name}\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+ GiB\s+\d+\.\d+x"


@pytest.mark.parametrize("extra", [[], ["--gradient-checkpointing", "--fast"]])
def test_bench_train_tiny_prints_three_rows_and_both_ratios(capsys, extra):
    assert main(["bench", "train", "--model", "tiny", "--steps", "1", "--warmup", "1", "--threads", "1", *extra]) == 0
    printed = capsys.readouterr().out
    assert ("UNet only, gradient checkpointing, median" in printed) == bool(extra)
    fast = re.search(r"^fast/floor\s+time \d+\.\d{3}  \(max \|loss fast - loss ours\|", printed, re.MULTILINE)
    assert bool(fast) == bool(extra)
    for name in ("floor", "ours", "reference"):
        assert re.search(ROW.format(name=name), printed, re.MULTILINE), printed
    assert re.search(r"^ours/floor\s+time \d+\.\d{3}", printed, re.MULTILINE), printed
    assert re.search(r"^ours/reference\s+time \d+\.\d{3}", printed, re.MULTILINE), printed


def test_bench_train_refuses_bad_arguments(capsys):
    assert main(["bench", "train", "--model", "tiny", "--resolution", "100"]) == 2
    assert "--resolution 100: use a multiple of 64" in capsys.readouterr().out
