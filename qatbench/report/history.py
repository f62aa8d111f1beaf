"""A metric's trend over the sweeps of an experiment, with its significant changes marked.

Data in (the sweeps of :mod:`qatbench.report.sources`), a :class:`History` out; the chart
page is rendered by :mod:`qatbench.report.pages`. Each trial's series is judged point by
point against its previous point: a timing metric with latency samples on both points by
the Mann-Whitney U test (p < alpha and a median shift of at least ``min_effect``) on the
samples :func:`qatbench.report.compare_samples.comparable_samples` picks, any other metric
by a relative change beyond ``threshold``. Over the whole series, :mod:`qatbench.report.steps`
finds the sweeps where the level stepped (``Series.steps``), which also catches a regression
that creeps in over several nightlies; :func:`history_json` is what a job reads.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qatbench.errors import ConfigError
from qatbench.measure.stats import ShiftTest, mann_whitney
from qatbench.report.compare import DEFAULT_ALPHA, DEFAULT_MIN_EFFECT, relative_change
from qatbench.report.compare_samples import (
    MIN_REPEATS,
    comparable_samples,
    repeat_samples,
    timing_samples,
)
from qatbench.report.sources import Sweep
from qatbench.report.steps import Step, detect_steps
from qatbench.results import TrialResult

DEFAULT_THRESHOLD = 0.05


@dataclass(frozen=True)
class Point:
    """The metric of one trial in one sweep and how it moved since the trial's previous point.

    ``direction`` is +1 (a significant rise), -1 (a significant fall) or 0; ``test`` is set
    when the shift test decided, else the threshold did; ``change`` is relative to the
    previous value (None for the first point).
    """

    sweep: int  # index into History.sweeps
    value: float
    run_id: str | None
    change: float | None = None
    test: ShiftTest | None = None
    direction: int = 0
    low: float | None = None  # interquartile range of the samples behind a timing metric
    high: float | None = None


@dataclass(frozen=True)
class Series:
    """One trial's points; ``steps`` are the level changes of the whole series (``Step.at``
    indexes ``points``)."""

    trial: str
    points: tuple[Point, ...]
    steps: tuple[Step, ...] = ()

    def step_sweeps(self) -> list[int]:
        """The sweep index (into History.sweeps) of each step's first point at the new level."""
        return [self.points[s.at].sweep for s in self.steps]

    @property
    def changes(self) -> list[Point]:
        return [p for p in self.points if p.direction]


@dataclass(frozen=True)
class History:
    experiment: str
    metric: str
    sweeps: tuple[tuple[str, str], ...]  # (sweep id, started), oldest first
    series: tuple[Series, ...]
    threshold: float
    alpha: float
    min_effect: float


def parse_threshold(text: str) -> float:
    """``5%`` or ``0.05`` as the fraction 0.05; a ConfigError when not a positive number."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"--threshold {text!r}: expected a relative change like 5% or 0.05")
    return value


def interval(trial: TrialResult, metric: str) -> tuple[float | None, float | None]:
    """The interquartile range of the samples the shift test ranks for this trial: one value
    per repeat when it timed at least MIN_REPEATS, else its rounds; (None, None) without."""
    samples, _ = repeat_samples(trial, metric)
    if len(samples) < MIN_REPEATS:
        samples, _ = timing_samples(trial, metric)
    if len(samples) < 2:
        return None, None
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q3


def _judge(
    previous: tuple[float, TrialResult],
    current: tuple[float, TrialResult],
    metric: str,
    threshold: float,
    alpha: float,
    min_effect: float,
) -> tuple[float, ShiftTest | None, int]:
    (a, trial_a), (b, trial_b) = previous, current
    change = relative_change(a, b)
    samples_a, samples_b, move = comparable_samples(trial_a, trial_b, metric)
    if samples_a and samples_b:
        test = mann_whitney(samples_a, samples_b, alpha=alpha, min_effect=min_effect)
        shift = (test.ratio > 1.0) - (test.ratio < 1.0)
        return change, test, shift * move if test.significant else 0
    moved = abs(change) > threshold
    return change, None, ((b > a) - (b < a)) if moved else 0


def history(
    experiment: str,
    sweeps: Sequence[Sweep],
    metric: str,
    *,
    trial: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    min_effect: float = DEFAULT_MIN_EFFECT,
) -> History:
    """The series of ``metric`` for every trial (or just ``trial``) over ``sweeps``.

    A ConfigError names what exists when no trial reports ``metric`` or ``trial`` is unknown.
    """
    ids = list(dict.fromkeys(t.id for s in sweeps for t in s.trials))
    if trial is not None and trial not in ids:
        raise ConfigError(
            f"--trial {trial!r}: no run of experiment {experiment!r} has that trial id; "
            f"trials: {', '.join(ids) or '(none)'}"
        )
    series = []
    for tid in [trial] if trial is not None else ids:
        points: list[Point] = []
        previous: tuple[float, TrialResult] | None = None
        for index, sweep in enumerate(sweeps):
            found = next((t for t in sweep.trials if t.id == tid), None)
            value = found.metrics.get(metric) if found is not None and found.ok else None
            if found is None or value is None or not math.isfinite(value):
                continue
            current = (value, found)
            low, high = interval(found, metric)
            point = Point(index, value, found.mlflow_run_id, low=low, high=high)
            if previous is not None:
                change, test, direction = _judge(
                    previous, current, metric, threshold, alpha, min_effect
                )
                point = Point(index, value, found.mlflow_run_id, change, test, direction, low, high)
            points.append(point)
            previous = current
        if points:
            steps = detect_steps([p.value for p in points], threshold)
            series.append(Series(tid, tuple(points), tuple(steps)))
    if not series:
        reported = sorted({m for s in sweeps for t in s.trials for m in t.metrics})
        raise ConfigError(
            f"--metric {metric!r}: no trial of experiment {experiment!r} reports it; "
            f"metrics: {', '.join(reported) or '(none)'}"
        )
    return History(
        experiment=experiment,
        metric=metric,
        sweeps=tuple((s.id, s.started) for s in sweeps),
        series=tuple(series),
        threshold=threshold,
        alpha=alpha,
        min_effect=min_effect,
    )


def history_json(hist: History) -> dict[str, Any]:
    """The history as plain data for a job: every point, its pointwise verdict, and the
    steps, each with the sweep id where the new level starts."""
    return {
        "experiment": hist.experiment,
        "metric": hist.metric,
        "threshold": hist.threshold,
        "alpha": hist.alpha,
        "min_effect": hist.min_effect,
        "step_method": "optimal partitioning, L2 cost / sigma^2, penalty 2 ln n",
        "sweeps": [{"id": sid, "started": started} for sid, started in hist.sweeps],
        "series": [
            {
                "trial": s.trial,
                "points": [
                    {
                        "sweep": hist.sweeps[p.sweep][0],
                        "value": p.value,
                        "run_id": p.run_id,
                        "change": p.change,
                        "p_value": p.test.p_value if p.test is not None else None,
                        "direction": p.direction,
                    }
                    for p in s.points
                ],
                "steps": [
                    {
                        "sweep": hist.sweeps[s.points[step.at].sweep][0],
                        "sweep_index": s.points[step.at].sweep,
                        "before": step.before,
                        "after": step.after,
                        "change": step.change,
                    }
                    for step in s.steps
                ],
            }
            for s in hist.series
        ],
    }
