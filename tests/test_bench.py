"""`python -m lora_train bench train` on the tiny model: four rows (floor, ours, reference, the CLI's whole run from
the file), both ratios taken over interleaved rounds, and the verdict on their precision; the rounds' bookkeeping
on made-up timings."""

from __future__ import annotations

import re

import pytest

from lora_train.bench_loops import BenchSettings, RowResult
from lora_train.bench_rounds import RowRounds, lengthened_steps, ratio, verdict
from lora_train.cli import main

ROW = r"^{name}\s+\d+\.\d+\s+\d+\.\d+%\s+\d+\.\d+\s+\d+\.\d+ GiB\s+\d+\.\d+x"


@pytest.mark.parametrize("extra", [["--rounds", "1"], ["--gradient-checkpointing", "--fast", "--rounds", "2"]])
def test_bench_train_tiny_prints_four_rows_and_both_ratios(capsys, extra):
    assert main(["bench", "train", "--model", "tiny", "--steps", "1", "--warmup", "1", "--threads", "1", *extra]) == 0
    printed = capsys.readouterr().out
    rounds = int(extra[-1])
    assert ("UNet only, gradient checkpointing, median" in printed) == (rounds == 2)
    fast = re.search(r"^fast/floor\s+time \d+\.\d{3}.*\(max \|loss fast - loss ours\|", printed, re.MULTILINE)
    assert bool(fast) == (rounds == 2)
    over = re.search(r"^ours/floor\s+time \d+\.\d{3} \(\d+\.\d{3}-\d+\.\d{3} over 2 rounds\)", printed, re.M)
    assert bool(over) == (rounds == 2), printed
    judged = re.search(r"^(ratios within ±5% over 2 rounds: trustworthy|NOT trustworthy to ±5%: )", printed, re.M)
    assert bool(judged) == (rounds == 2) and ("precision is unknown" in printed) == (rounds == 1)
    for name in ("floor", "ours", "reference", "cli"):
        assert re.search(ROW.format(name=name), printed, re.MULTILINE), printed
    assert re.search(r"^cli/floor\s+time \d+\.\d{3}.*memory \d+\.\d{3} \(the whole command", printed, re.M), printed
    assert re.search(r"^ours/floor\s+time \d+\.\d{3}", printed, re.MULTILINE), printed
    assert re.search(r"^ours/reference\s+time \d+\.\d{3}", printed, re.MULTILINE), printed


def test_bench_train_refuses_bad_arguments(capsys):
    assert main(["bench", "train", "--model", "tiny", "--resolution", "100"]) == 2
    assert "--resolution 100: use a multiple of 64" in capsys.readouterr().out


def row(name: str, *medians_s: float) -> RowResult:
    return RowResult(name, [0.0, *medians_s], [1.0], peak_bytes=1, warmup=1)


def test_ratios_are_taken_within_each_round_and_judged_by_their_spread():
    rounds = {"floor": RowRounds("floor", [row("floor", 1.0), row("floor", 2.0), row("floor", 1.0)]),
              "ours": RowRounds("ours", [row("ours", 0.9), row("ours", 1.8), row("ours", 0.9)])}
    steady = ratio(rounds, "ours", "floor")
    assert steady.per_round == pytest.approx([0.9, 0.9, 0.9]) and steady.spread == pytest.approx(0)
    assert rounds["floor"].spread == pytest.approx(1.0), "the busy second round shows in the row's own spread"
    assert "trustworthy to ±5%" in verdict({"ours/floor": steady})
    rounds["ours"].rounds[1] = row("ours", 2.4)
    assert "NOT trustworthy" in verdict({"ours/floor": ratio(rounds, "ours", "floor")})


def test_short_steps_get_more_timed_steps_after_the_first_round():
    rows = [RowRounds("floor", [row("floor", 0.01)]), RowRounds("ours", [row("ours", 0.5)])]
    assert lengthened_steps(BenchSettings(steps=5), rows) == 100  # 1 s of the fastest row at 10 ms/step
    assert lengthened_steps(BenchSettings(steps=5), [RowRounds("floor", [row("floor", 2.0)])]) == 5
