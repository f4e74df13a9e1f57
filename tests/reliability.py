"""The reliability suite's settings and its result table (printed at the end of the pytest run).

``DRSYNC_RELIABILITY=full`` (make reliability) runs every scenario with many
trials; the default short level runs a few of each inside make test.
``DRSYNC_SEED`` replays a run: every scenario draws its faults from it.
:func:`combinations` does the same for a test's parameter grid: every value of every axis in
make test, every combination of them in make reliability.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LEVEL = os.environ.get("DRSYNC_RELIABILITY", "short")
SEED = int(os.environ.get("DRSYNC_SEED", "20261124"))
_TRIALS = {
    "short": {"kill": 4, "bitflip": 6, "diskfull": 1, "network": 3, "fuzz": 40, "fencing": 2,
              "rogue": 12, "deletion": 3, "skew": 1},
    "full": {"kill": 50, "bitflip": 40, "diskfull": 5, "network": 20, "fuzz": 400, "fencing": 12,
             "rogue": 120, "deletion": 15, "skew": 6},
}


def combinations(*axes: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Parameter sets over ``axes``: at the full level every combination (``itertools.product``);
    otherwise a diagonal that still takes every value of every axis at least once (as many sets as
    the longest axis has values), for grids whose every cell costs seconds in make test."""
    if LEVEL == "full" or not axes or not all(axes):  # no axes or an empty one: as the product has it
        return list(itertools.product(*axes))
    return [tuple(axis[i % len(axis)] for axis in axes) for i in range(max(map(len, axes)))]


def trials(scenario: str) -> int:
    return _TRIALS.get(LEVEL, _TRIALS["short"])[scenario]


@dataclass
class ScenarioResult:
    scenario: str
    trials: int
    faults: int
    violations: int
    lost: int
    seed: int


RESULTS: list[ScenarioResult] = []


def record(scenario: str, trials: int, faults: int, violations: int, lost: int) -> None:
    RESULTS.append(ScenarioResult(scenario, trials, faults, violations, lost, SEED))


def table() -> list[str]:
    lines = [f"reliability ({LEVEL}, seed {SEED}; replay with DRSYNC_SEED={SEED})",
             f"{'scenario':44} {'trials':>7} {'faults':>7} {'violations':>11} {'data lost':>10}"]
    lines += [f"{r.scenario:44} {r.trials:7d} {r.faults:7d} {r.violations:11d} {r.lost:10d}" for r in RESULTS]
    return lines
