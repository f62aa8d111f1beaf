"""The samples behind a timing metric, which the shift tests of compare and history rank.

Latency, throughput and speed-up metrics ``*_bN`` come from the per-call ms of every timed
round in ``details["latency_samples"]["bN"]``; generation timings of language models from
``details["generation"]["samples"]``. :func:`comparable_samples` picks, for two trials, one
value per repeat when both timed at least ``MIN_REPEATS`` repeats (the rounds of one repeat
move together on a busy machine), else the rounds themselves. Missing or malformed samples
are no samples (``[]``), never an error.
"""

from __future__ import annotations

import math
import re
import statistics

from qatbench.results import TrialResult

TIMING_METRIC = re.compile(
    r"^(?P<family>fp32_latency|latency|throughput|speedup)_(?P<stat>[a-z0-9_]*?)_?b(?P<n>\d+)$"
)
# Generation timings (language models), sampled in details["generation"]["samples"].
GENERATION_METRIC = re.compile(
    r"^(?P<fp32>fp32_)?(?:recompute_)?(?P<phase>prefill|decode)_"
    r"(?P<stat>latency_p50_ms(?:_per_token)?|tokens_per_s|speedup_vs_fp32)$"
)
# Timing metrics that describe a distribution's spread, not its position: no shift test.
SPREAD_METRIC = re.compile(r"^latency_cv_b\d+$")


def batch_samples(trial: TrialResult, batch: int | str, side: str = "candidate_ms") -> list[float]:
    """Per-call ms of every timed round at ``batch`` (``candidate_ms`` or ``fp32_ms``); [] if
    the trial recorded none or they are malformed."""
    bucket = trial.details.get("latency_samples", {})
    values = bucket.get(f"b{batch}", {}).get(side) if isinstance(bucket, dict) else None
    return _floats(values)


def timing_samples(trial: TrialResult, metric: str) -> tuple[list[float], int]:
    """The samples behind a timing metric and how the metric moves when they rise (+1/-1).

    Latency metrics: the candidate's per-call ms (fp32's for ``fp32_latency_*``); throughput:
    the same ms, moving the other way; speed-up: the per-round ratio fp32 / candidate of the
    paired rounds. ``([], 0)`` when the metric is not a timing one or samples are missing.
    """
    if gen := GENERATION_METRIC.match(metric):
        return _generation_samples(trial, gen)
    match = TIMING_METRIC.match(metric)
    if match is None or SPREAD_METRIC.match(metric):
        return [], 0
    family, n = match["family"], match["n"]
    if family == "speedup":
        cand, base = batch_samples(trial, n), batch_samples(trial, n, "fp32_ms")
        if not cand or len(cand) != len(base) or min(cand) <= 0:
            return [], 0
        return [f / c for f, c in zip(base, cand, strict=True)], 1
    side = "fp32_ms" if family == "fp32_latency" else "candidate_ms"
    samples = batch_samples(trial, n, side)
    return (samples, -1 if family == "throughput" else 1) if samples else ([], 0)


MIN_REPEATS = 6  # fewer per side and the rank test can never reach p < 0.01


def repeat_samples(trial: TrialResult, metric: str) -> tuple[list[float], int]:
    """One value per repeat behind a timing metric, as :func:`timing_samples`.

    A repeat is a block of rounds (``measure.repeats``): the median of its rounds (latency,
    throughput) or fp32 median / candidate median within it (speed-up). ``([], 0)`` for
    generation metrics and for trials recorded without repeats.
    """
    match = TIMING_METRIC.match(metric)
    if match is None or SPREAD_METRIC.match(metric):
        return [], 0
    family, n = match["family"], match["n"]
    bucket = trial.details.get("latency_samples", {})
    rounds = bucket.get(f"b{n}", {}) if isinstance(bucket, dict) else {}
    labels = rounds.get("repeat_of_round") if isinstance(rounds, dict) else None
    cand, base = batch_samples(trial, n), batch_samples(trial, n, "fp32_ms")
    if not isinstance(labels, list) or not cand or not len(labels) == len(cand) == len(base):
        return [], 0
    values = []
    for repeat in dict.fromkeys(labels):
        c = [v for v, k in zip(cand, labels, strict=True) if k == repeat]
        b = [v for v, k in zip(base, labels, strict=True) if k == repeat]
        if family == "speedup":
            values.append(statistics.median(b) / statistics.median(c))
        else:
            values.append(statistics.median(b if family == "fp32_latency" else c))
    return values, 1 if family in ("speedup", "latency", "fp32_latency") else -1


def comparable_samples(
    trial_a: TrialResult, trial_b: TrialResult, metric: str
) -> tuple[list[float], list[float], int]:
    """The samples a timing metric of two trials is tested on, and its move (+1/-1).

    Per repeat when both trials have at least MIN_REPEATS: a busy spell of the machine
    moves every round of a repeat together, so rounds are not independent and a rank test
    on thousands of them calls any drift significant; repeats are the independent unit.
    Per round otherwise (trials recorded before repeats, or with too few of them).
    """
    (ra, move), (rb, _) = repeat_samples(trial_a, metric), repeat_samples(trial_b, metric)
    if len(ra) >= MIN_REPEATS and len(rb) >= MIN_REPEATS:
        return ra, rb, move
    (sa, move), (sb, _) = timing_samples(trial_a, metric), timing_samples(trial_b, metric)
    return sa, sb, move


def _generation_samples(trial: TrialResult, match: re.Match[str]) -> tuple[list[float], int]:
    """Prefill or decode rounds of ``details["generation"]["samples"]``, as timing_samples."""
    generation = trial.details.get("generation")
    bucket = generation.get("samples") if isinstance(generation, dict) else None
    phase = bucket.get(match["phase"]) if isinstance(bucket, dict) else None
    if not isinstance(phase, dict):
        return [], 0
    cand = _floats(phase.get("candidate_ms"))
    base = _floats(phase.get("fp32_ms"))
    if match["stat"] == "speedup_vs_fp32":
        if not cand or len(cand) != len(base) or min(cand) <= 0:
            return [], 0
        return [f / c for f, c in zip(base, cand, strict=True)], 1
    samples = base if match["fp32"] else cand
    return (samples, -1 if match["stat"] == "tokens_per_s" else 1) if samples else ([], 0)


def _floats(values: object) -> list[float]:
    """Finite floats of a JSON list; [] when it is not one or holds something else."""
    if not isinstance(values, list):
        return []
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        return []
    return [v for v in floats if math.isfinite(v)]
