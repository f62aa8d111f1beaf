"""Statistics of repeated measurements: summaries, intervals, paired ratios, shift tests.

Pure computation on sequences of floats (numpy only: no torch, no clocks, no output), so the
timer, the reports and ``compare`` share one definition of every number. Rendering lives
elsewhere. Quantiles use linear interpolation between order statistics (numpy's default,
Hyndman & Fan type 7); the standard deviation is the sample one (n - 1), 0 for one sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Samples = Sequence[float] | NDArray[np.floating[Any]]
"""Measurements as a sequence of numbers or a 1-D float array."""

# Bootstrap resamples are drawn in blocks of at most this many elements to bound memory.
_BOOTSTRAP_BLOCK_ELEMENTS = 1 << 20
_TUKEY_FENCE = 1.5
_UNSTABLE_CV = 0.1
_UNSTABLE_OUTLIER_FRACTION = 0.1


@dataclass(frozen=True)
class Summary:
    """Descriptive statistics of one sample, in the sample's own unit.

    ``outliers`` counts values outside Tukey's fences (1.5 IQR beyond the quartiles);
    ``cv`` is stddev / mean; ``median_ci_low``/``median_ci_high`` bound a 95%
    distribution-free confidence interval of the median; ``unstable`` flags a sample whose
    cv exceeds 0.1 or whose outliers exceed 10% of n.
    """

    n: int
    min: float
    max: float
    mean: float
    stddev: float
    median: float
    iqr: float
    q1: float
    q3: float
    p90: float
    p95: float
    p99: float
    outliers: int
    cv: float
    median_ci_low: float
    median_ci_high: float
    unstable: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Ratio:
    """A ratio with the bounds of its confidence interval."""

    value: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class ShiftTest:
    """Outcome of a two-sample shift test of ``b`` against ``a``.

    ``effect`` is Cliff's delta of b over a, P(b > a) - P(b < a), in [-1, 1]; ``ratio`` is
    median(b) / median(a).
    """

    p_value: float
    effect: float
    ratio: float
    significant: bool


def _as_array(samples: Samples, name: str = "samples") -> NDArray[np.float64]:
    values = np.asarray(samples, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers")
    return values


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _median_ci_indices(n: int, confidence: float) -> tuple[int, int]:
    """0-based order-statistic indices bounding the median with at least ``confidence``.

    The count of samples below the median is Binomial(n, 1/2). The interval
    [x(j), x(n-j+1)] (1-based) covers the median with probability 1 - 2 P(B <= j - 1);
    the largest j keeping that at least ``confidence`` is chosen. When even j = 1 falls
    short (n <= 5 at 95%) the interval is [min, max].
    """
    i = np.arange(n // 2 + 1)
    # log C(n, i) built as a cumulative sum of log((n - t) / (t + 1)), then minus n log 2.
    log_comb = np.concatenate(([0.0], np.cumsum(np.log((n - i[:-1]) / (i[:-1] + 1)))))
    cdf = np.cumsum(np.exp(log_comb - n * math.log(2.0)))
    j = int(np.searchsorted(cdf, (1.0 - confidence) / 2.0, side="right"))
    low = max(j, 1) - 1
    return low, n - 1 - low


def median_ci(samples: Samples, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median from binomial order statistics."""
    _check_confidence(confidence)
    values = np.sort(_as_array(samples))
    low, high = _median_ci_indices(values.size, confidence)
    return float(values[low]), float(values[high])


def _coefficient_of_variation(stddev: float, mean: float) -> float:
    if mean != 0.0:
        return stddev / abs(mean)
    return 0.0 if stddev == 0.0 else math.inf


def summarize(samples: Samples) -> Summary:
    """Summarise one sample; raises ValueError when it is empty."""
    values = np.sort(_as_array(samples))
    n = values.size
    mean = float(values.mean())
    stddev = float(values.std(ddof=1)) if n > 1 else 0.0
    q1, median, q3, p90, p95, p99 = (
        float(q) for q in np.percentile(values, [25, 50, 75, 90, 95, 99])
    )
    iqr = q3 - q1
    low_fence, high_fence = q1 - _TUKEY_FENCE * iqr, q3 + _TUKEY_FENCE * iqr
    outliers = int(np.count_nonzero((values < low_fence) | (values > high_fence)))
    cv = _coefficient_of_variation(stddev, mean)
    ci_low, ci_high = median_ci(values)
    return Summary(
        n=n,
        min=float(values[0]),
        max=float(values[-1]),
        mean=mean,
        stddev=stddev,
        median=median,
        iqr=iqr,
        q1=q1,
        q3=q3,
        p90=p90,
        p95=p95,
        p99=p99,
        outliers=outliers,
        cv=cv,
        median_ci_low=ci_low,
        median_ci_high=ci_high,
        unstable=bool(cv > _UNSTABLE_CV or outliers > _UNSTABLE_OUTLIER_FRACTION * n),
    )


def paired_ratio_of_medians(
    baseline: Samples,
    candidate: Samples,
    *,
    blocks: Sequence[int] | None = None,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Ratio:
    """median(baseline) / median(candidate) with a seeded paired-bootstrap interval.

    With times as samples this is the candidate's speed-up over the baseline. Element i of
    both sequences belongs to round i; a resample keeps the pairs together, so drift shared
    by a round cancels. The interval is the percentile interval of the resampled ratios.

    ``blocks`` labels each round with the block (repeat) it was timed in. Rounds of one
    block are not independent: a busy spell of the machine lasts longer than a round and
    moves every ratio taken in it. With two or more blocks the bootstrap is two-stage:
    it draws blocks with replacement, then rounds with replacement within each drawn block,
    so the interval carries the spread between blocks as well as within them. Without
    blocks (or with one) it draws rounds, as for independent rounds.
    """
    _check_confidence(confidence)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    base = _as_array(baseline, "baseline")
    cand = _as_array(candidate, "candidate")
    if base.size != cand.size:
        raise ValueError(f"paired samples must have equal lengths, got {base.size} and {cand.size}")
    members = _block_members(blocks, base.size)
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    width = (
        sum(len(m) for m in members)
        if len(members) == 1
        else len(members) * max(len(m) for m in members)
    )
    rows_per_chunk = max(1, _BOOTSTRAP_BLOCK_ELEMENTS // width)
    for start in range(0, resamples, rows_per_chunk):
        rows = min(rows_per_chunk, resamples - start)
        rounds = _resampled_rounds(rng, members, rows)
        ratios[start : start + rows] = np.nanmedian(_take(base, rounds), axis=1) / np.nanmedian(
            _take(cand, rounds), axis=1
        )
    alpha = 1.0 - confidence
    ci_low, ci_high = np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0])
    value = float(np.median(base) / np.median(cand))
    return Ratio(value=value, ci_low=float(ci_low), ci_high=float(ci_high))


def _block_members(blocks: Sequence[int] | None, n: int) -> list[NDArray[np.intp]]:
    """Round indices of each block, in order of first appearance; one block if none."""
    if blocks is None:
        return [np.arange(n)]
    labels = np.asarray(blocks)
    if labels.shape != (n,):
        raise ValueError(f"blocks must label each of the {n} rounds, got {labels.shape}")
    _, first = np.unique(labels, return_index=True)
    return [np.flatnonzero(labels == labels[i]) for i in np.sort(first)]


def _resampled_rounds(
    rng: np.random.Generator, members: list[NDArray[np.intp]], rows: int
) -> NDArray[np.intp]:
    """``rows`` resamples of round indices; -1 pads blocks shorter than the longest."""
    if len(members) == 1:
        only = members[0]
        return only[rng.integers(0, only.size, size=(rows, only.size))]
    longest = max(m.size for m in members)
    padded = np.full((len(members), longest), -1, dtype=np.intp)
    for i, m in enumerate(members):
        padded[i, : m.size] = m
    sizes = np.array([m.size for m in members])
    drawn = rng.integers(0, len(members), size=(rows, len(members)))  # blocks
    slot = (rng.random((rows, len(members), longest)) * sizes[drawn][..., None]).astype(np.intp)
    picked = padded[drawn[..., None], slot]  # a round of the drawn block, per slot
    picked[np.arange(longest) >= sizes[drawn][..., None]] = -1
    return picked.reshape(rows, -1)


def _take(values: NDArray[np.float64], rounds: NDArray[np.intp]) -> NDArray[np.float64]:
    """values[rounds] with NaN where the index is the -1 pad (ignored by nanmedian)."""
    taken = values[np.maximum(rounds, 0)]
    taken[rounds < 0] = np.nan
    return taken


def _ranks_and_tie_term(values: NDArray[np.float64]) -> tuple[NDArray[np.float64], float]:
    """Average ranks (1-based, ties share their mean rank) and sum(t^3 - t) over tie groups."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    average_rank = first_rank + (counts - 1) / 2.0
    tie_term = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    return average_rank[inverse], tie_term


def _ratio_of_medians(numerator: float, denominator: float) -> float:
    if denominator != 0.0:
        return numerator / denominator
    return 1.0 if numerator == 0.0 else math.copysign(math.inf, numerator)


def mann_whitney(
    a: Samples,
    b: Samples,
    *,
    alpha: float = 0.01,
    min_effect: float = 0.05,
) -> ShiftTest:
    """Two-sided Mann-Whitney U test of ``b`` against ``a`` (e.g. a = baseline times).

    The p-value uses the normal approximation with tie correction and continuity
    correction (the same number as ``scipy.stats.mannwhitneyu(..., method="asymptotic")``).
    The shift is significant only when p < alpha AND the medians differ by at least
    ``min_effect`` relative to median(a), so a tiny but consistent change on a quiet
    machine is not reported as a regression. When median(a) is zero the ratio is 1 if
    median(b) is zero too, else an infinite relative change with the sign of median(b).
    """
    xa, xb = _as_array(a, "a"), _as_array(b, "b")
    n_a, n_b = xa.size, xb.size
    n = n_a + n_b
    ranks, tie_term = _ranks_and_tie_term(np.concatenate((xa, xb)))
    u_b = float(ranks[n_a:].sum()) - n_b * (n_b + 1) / 2.0
    u_max = max(u_b, n_a * n_b - u_b)
    mean_u = n_a * n_b / 2.0
    variance_u = n_a * n_b / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
    if variance_u > 0.0:
        z = (u_max - mean_u - 0.5) / math.sqrt(variance_u)
        p_value = min(1.0, math.erfc(z / math.sqrt(2.0)))
    else:  # every value is tied: no evidence of a shift
        p_value = 1.0
    ratio = _ratio_of_medians(float(np.median(xb)), float(np.median(xa)))
    return ShiftTest(
        p_value=p_value,
        effect=2.0 * u_b / (n_a * n_b) - 1.0,
        ratio=ratio,
        significant=p_value < alpha and abs(ratio - 1.0) >= min_effect,
    )
