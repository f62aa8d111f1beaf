"""Thresholds of ``METRIC:auto`` gates: each trial's own run-to-run spread, from history.

A bare percentage is a guess about the machine; ``--gate speedup_vs_fp32:auto`` asks the
store instead. For every trial the threshold is

    max(floor, Z * sqrt(2) * spread)

where ``spread`` is the relative robust standard deviation (1.4826 * MAD / median) of that
trial's metric over the experiment's last ``K`` sweeps before the judged one: the change
between two independent nightlies has sqrt(2) times the spread of one, and Z = 3 puts a
false alarm from the threshold alone at about 3 in 1000 per metric and trial (the timing
samples must, in addition, differ significantly; see :mod:`qatbench.report.compare`).
A trial with fewer than ``MIN_HISTORY`` previous values takes the machine's figure from
``qatbench selftest`` (its smallest detectable slowdown), else ``DEFAULT_LIMIT``. Every
threshold carries where it came from, which the breach message prints.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qatbench.report.sources import Sweep

K_SWEEPS = 10
MIN_HISTORY = 4  # values needed before a spread means anything
Z = 3.0
FLOOR = 0.05  # the shift test's own min_effect: a smaller gate could not breach anyway
DEFAULT_LIMIT = 0.10


@dataclass(frozen=True)
class Threshold:
    """A relative limit (0.05 = 5%) and where it came from, in words."""

    limit: float
    source: str


@dataclass(frozen=True)
class AutoThresholds:
    """Per (trial id, metric) thresholds, and the one for everything else."""

    per_trial: Mapping[tuple[str, str], Threshold]
    fallback: Threshold

    def get(self, trial: str, metric: str) -> Threshold:
        return self.per_trial.get((trial, metric), self.fallback)


def relative_spread(values: Sequence[float]) -> float:
    """1.4826 * MAD / |median|: the relative sd of a normal sample, robust to one outlier."""
    median = statistics.median(values)
    if median == 0:
        return math.inf
    mad = statistics.median(abs(v - median) for v in values)
    return 1.4826 * mad / abs(median)


def fallback_threshold(selftest_limit: float | None, selftest_source: str = "") -> Threshold:
    """Without history: the self-test's smallest detectable slowdown, else DEFAULT_LIMIT."""
    if selftest_limit is not None and math.isfinite(selftest_limit) and selftest_limit > 0:
        limit = max(FLOOR, selftest_limit)
        return Threshold(
            limit,
            f"no history; selftest {selftest_source}: smallest detectable {selftest_limit:.1%}",
        )
    return Threshold(DEFAULT_LIMIT, f"no history and no selftest: default {DEFAULT_LIMIT:.0%}")


def auto_thresholds(
    sweeps: Sequence[Sweep],
    metrics: Sequence[str],
    fallback: Threshold,
    *,
    k: int = K_SWEEPS,
    floor: float = FLOOR,
    z: float = Z,
) -> AutoThresholds:
    """Thresholds of ``metrics`` for every trial of the last ``k`` of ``sweeps`` (the sweeps
    before the judged one, oldest first)."""
    recent = list(sweeps)[-k:] if k > 0 else []
    values: dict[tuple[str, str], list[float]] = {}
    for sweep in recent:
        for trial in sweep.trials:
            if not trial.ok:
                continue
            for metric in metrics:
                value = trial.metrics.get(metric)
                if value is not None and math.isfinite(value):
                    values.setdefault((trial.id, metric), []).append(value)
    per_trial = {}
    for key, series in values.items():
        if len(series) < MIN_HISTORY:
            continue
        spread = relative_spread(series)
        if not math.isfinite(spread):
            continue
        limit = max(floor, z * math.sqrt(2.0) * spread)
        bound = "floor" if limit == floor else f"{z:g} x sqrt2 x spread"
        per_trial[key] = Threshold(
            limit, f"{bound}; spread {spread:.1%} over the last {len(series)} sweeps"
        )
    return AutoThresholds(per_trial, fallback)
