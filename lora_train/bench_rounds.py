"""Interleaved rounds for `bench train`, so its ratios hold on a busy machine.

Every round runs each row once, in order (floor, ours, reference, floor, ours, …): a busy spell slows the rows of
one round alike instead of one row alone. A ratio (ours/floor, …) is taken within each round and summarised by its
median and its spread over the rounds; the summary says whether the spread is within ±5 %, the precision a
ratio in the summary line claims. Rows whose steps are short get more timed steps after the first round, so that
each row's timed part lasts long enough to measure.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Sequence

from .bench_loops import BenchSettings, RowResult

TRUSTED_SPREAD = 0.05  # a ratio is trusted when every round is within ±5 % of the median
MIN_TIMED_SECONDS = 1.0  # the shortest row's timed steps last at least this long from round 2 on
MAX_STEPS = 200


@dataclass
class RowRounds:
    """One row's results over the rounds."""

    name: str
    rounds: List[RowResult]

    @property
    def median_ms(self) -> float:
        return statistics.median(row.median_ms for row in self.rounds)

    @property
    def spread(self) -> float:
        """The largest relative distance of a round's median from the median of all rounds."""
        return max(abs(row.median_ms / self.median_ms - 1) for row in self.rounds)

    @property
    def peak_bytes(self) -> int:
        return max(row.peak_bytes for row in self.rounds)

    @property
    def first(self) -> RowResult:
        return self.rounds[0]


@dataclass
class Ratio:
    """A ratio of two rows' step times, taken within each round."""

    per_round: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.per_round)

    @property
    def spread(self) -> float:
        return max(abs(value / self.median - 1) for value in self.per_round)

    def describe(self) -> str:
        if len(self.per_round) == 1:
            return f"{self.median:.3f}"
        return (f"{self.median:.3f} ({min(self.per_round):.3f}-{max(self.per_round):.3f} over "
                f"{len(self.per_round)} rounds)")


def run_rounds(settings: BenchSettings, names: Sequence[str], rounds: int,
               run_one: Callable[[str, BenchSettings], RowResult]) -> Dict[str, RowRounds]:
    """Runs every named row once per round, interleaved; steps are lengthened after round 1 if they are short."""
    results = {name: RowRounds(name, []) for name in names}
    for index in range(rounds):
        for name in names:
            results[name].rounds.append(run_one(name, settings))
        if index == 0 and rounds > 1:
            settings = replace(settings, steps=lengthened_steps(settings, results.values()))
    return results


def lengthened_steps(settings: BenchSettings, rows) -> int:
    """Timed steps per row such that the fastest row's timed part lasts MIN_TIMED_SECONDS (never fewer)."""
    fastest_s = min(row.first.median_ms for row in rows) / 1000
    wanted = math.ceil(MIN_TIMED_SECONDS / max(fastest_s, 1e-6))
    return min(MAX_STEPS, max(settings.steps, wanted))


def ratio(results: Dict[str, RowRounds], numerator: str, denominator: str) -> Ratio:
    pairs = zip(results[numerator].rounds, results[denominator].rounds)
    return Ratio([top.median_ms / bottom.median_ms for top, bottom in pairs])


def verdict(ratios: Dict[str, Ratio]) -> str:
    """Whether the summary's ratios can be trusted to ±5 %, and if not, which one moved and by how much."""
    rounds = len(next(iter(ratios.values())).per_round)
    if rounds < 2:
        return "one round: the ratios' precision is unknown (use --rounds 3 or more)"
    worst_name, worst = max(ratios.items(), key=lambda item: item[1].spread)
    if worst.spread <= TRUSTED_SPREAD:
        return f"ratios within ±{TRUSTED_SPREAD:.0%} over {rounds} rounds: trustworthy to ±{TRUSTED_SPREAD:.0%}"
    return (f"NOT trustworthy to ±{TRUSTED_SPREAD:.0%}: {worst_name} varied ±{worst.spread:.0%} over {rounds} "
            "rounds (a busy machine); rerun with more --rounds when the load average is low")
