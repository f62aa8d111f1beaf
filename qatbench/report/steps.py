"""Change points of a series: where a trial's metric stepped, found over the whole series.

The pointwise tests of :mod:`qatbench.report.history` judge each sweep against the one before;
a regression that creeps in over several nightlies (2% a night) passes every one of them.
Step detection looks at the whole series instead, like asv's ``step_detect``: it fits a
piecewise-constant function by exact optimal partitioning (dynamic programming) and minimises

    sum over segments of  sum((x - mean(segment))^2) / sigma^2   +   penalty * (segments - 1)

with ``penalty = 2 * ln(n)`` (BIC-like: a step must explain more than the noise would by
chance) and ``sigma`` the noise of one point, estimated robustly from the differences of
consecutive points (a step changes one difference only):
``sigma = 1.4826 * median(|x[i+1] - x[i]|) / sqrt(2)``, at least ``threshold / 3`` of the
series' median so that a deterministic metric does not make every wobble a step. A fitted
step is reported when the segment means differ by more than ``threshold`` (relative); its
sweep is the first point of the new level. Cost O(n^2) in the number of points.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """A level change: the series' ``at``-th point is the first at the new level."""

    at: int  # index into the series' points
    before: float  # mean of the segment before
    after: float  # mean of the segment from ``at``
    change: float  # (after - before) / |before|


def noise_sigma(values: Sequence[float], threshold: float) -> float:
    """The robust per-point noise, floored at ``threshold / 3`` of the median's size."""
    scale = abs(statistics.median(values)) if values else 0.0
    floor = max(threshold * scale / 3.0, 1e-12 * max(scale, 1.0), 1e-300)
    if len(values) < 3:
        return floor
    diffs = [abs(b - a) for a, b in itertools.pairwise(values)]
    return max(1.4826 * statistics.median(diffs) / math.sqrt(2.0), floor)


def detect_steps(values: Sequence[float], threshold: float = 0.05) -> list[Step]:
    """The steps of ``values`` (oldest first) bigger than ``threshold`` (relative)."""
    n = len(values)
    if n < 3:
        return []
    sigma = noise_sigma(values, threshold)
    x = [v / sigma for v in values]
    prefix, prefix2 = [0.0], [0.0]
    for v in x:
        prefix.append(prefix[-1] + v)
        prefix2.append(prefix2[-1] + v * v)

    def cost(i: int, j: int) -> float:  # points i..j-1
        s, s2, m = prefix[j] - prefix[i], prefix2[j] - prefix2[i], j - i
        return s2 - s * s / m

    penalty = 2.0 * math.log(n)
    best = [0.0] + [math.inf] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            total = best[i] + cost(i, j) + (penalty if i else 0.0)
            if total < best[j]:
                best[j], start[j] = total, i
    bounds, j = [], n
    while j > 0:
        bounds.append((start[j], j))
        j = start[j]
    bounds.reverse()
    means = [statistics.fmean(values[i:j]) for i, j in bounds]
    steps = []
    for (at, _), before, after in zip(bounds[1:], means, means[1:], strict=False):
        change = (after - before) / abs(before) if before else math.copysign(math.inf, after)
        if abs(change) > threshold:
            steps.append(Step(at, before, after, change))
    return steps
