"""Statistics against hand-computed values, scipy, and synthetic data with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from qatbench.measure.stats import (
    Ratio,
    mann_whitney,
    median_ci,
    paired_ratio_of_medians,
    summarize,
)


def test_summary_matches_hand_computed_values() -> None:
    # sorted x = [2, 4, 4, 4, 5, 5, 7, 9], n = 8, sum 40 -> mean 5
    # squared deviations 9+1+1+1+0+0+4+16 = 32 -> sample variance 32/7
    # quantile at p sits at 0-based position 7p (linear interpolation):
    #   q1: 1.75 -> 4 + .75*(4-4) = 4      median: 3.5 -> 4 + .5*(5-4) = 4.5
    #   q3: 5.25 -> 5 + .25*(7-5) = 5.5    p90: 6.3 -> 7 + .3*(9-7) = 7.6
    #   p95: 6.65 -> 7 + .65*2 = 8.3       p99: 6.93 -> 7 + .93*2 = 8.86
    # iqr 1.5 -> fences 4 - 2.25 = 1.75 and 5.5 + 2.25 = 7.75 -> only 9 is outside
    # median CI at n = 8: P(B <= 0) = 1/256 <= .025 < P(B <= 1) = 9/256 -> ranks 1 and 8
    s = summarize([9, 4, 2, 5, 4, 7, 4, 5])
    assert s.n == 8
    assert (s.min, s.max, s.mean) == (2.0, 9.0, 5.0)
    assert s.stddev == pytest.approx(math.sqrt(32 / 7))
    assert (s.q1, s.median, s.q3, s.iqr) == pytest.approx((4.0, 4.5, 5.5, 1.5))
    assert (s.p90, s.p95, s.p99) == pytest.approx((7.6, 8.3, 8.86))
    assert s.outliers == 1
    assert s.cv == pytest.approx(math.sqrt(32 / 7) / 5)
    assert (s.median_ci_low, s.median_ci_high) == (2.0, 9.0)
    assert s.unstable  # cv = 0.43 > 0.1


def test_summary_of_a_quiet_sample_is_stable() -> None:
    # x = [10, 10, 11, 11, 12]: mean 10.8, deviations^2 .64+.64+.04+.04+1.44 = 2.8
    # variance 2.8/4 = .7, cv = sqrt(.7)/10.8 = .0775 <= .1
    # q1 at position 1 -> 10, q3 at position 3 -> 11; fences 8.5 and 12.5 -> no outliers
    s = summarize([10, 11, 12, 10, 11])
    assert s.stddev == pytest.approx(math.sqrt(0.7))
    assert s.cv == pytest.approx(math.sqrt(0.7) / 10.8)
    assert (s.q1, s.q3, s.outliers) == (10.0, 11.0, 0)
    assert not s.unstable


def test_many_tukey_outliers_make_a_sample_unstable() -> None:
    # 18 values of 100 and two of 101: q1 = q3 = 100, iqr 0, so both 101s are outliers
    # while cv stays tiny; 2 outliers of 20 is not > 10%, one more (3 of 21) is
    quiet = [100.0] * 18 + [101.0] * 2
    assert (summarize(quiet).outliers, summarize(quiet).unstable) == (2, False)
    noisy = summarize([*quiet, 101.0])
    assert noisy.cv < 0.01
    assert (noisy.outliers, noisy.unstable) == (3, True)


def test_summary_of_one_sample_and_of_none() -> None:
    s = summarize([3.0])
    assert (s.n, s.stddev, s.cv, s.median_ci_low, s.median_ci_high) == (1, 0.0, 0.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        summarize([])


def test_summary_to_dict_is_json_serialisable() -> None:
    data = summarize([1.0, 2.0, 3.0, 4.0]).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) >= {"n", "median", "p99", "outliers", "median_ci_low", "unstable"}


def test_median_ci_uses_binomial_order_statistics() -> None:
    # n = 10: P(B <= 1) = 11/1024 = .0107 <= .025 < P(B <= 2) = 56/1024 -> ranks 2 and 9
    assert median_ci(range(1, 11)) == (2.0, 9.0)
    # n = 20: P(B <= 5) = 21700/2^20 = .0207 <= .025 < P(B <= 6) = 60460/2^20 -> ranks 6, 15
    assert median_ci(range(1, 21)) == (6.0, 15.0)
    # n = 5: even [min, max] covers only 1 - 2/32 = .94 < .95 -> fall back to min and max
    assert median_ci([5, 1, 3, 2, 4]) == (1.0, 5.0)
    # 90%: n = 10, P(B <= 2) = .0547 > .05 -> still ranks 2 and 9; n = 20, P(B <= 5) <= .05
    assert median_ci(range(1, 21), confidence=0.9) == (6.0, 15.0)


def test_median_ci_contains_the_median_and_narrows_with_n() -> None:
    rng = np.random.default_rng(7)
    widths = []
    for n in (20, 200, 2000):
        sample = rng.lognormal(size=n)
        low, high = median_ci(sample)
        assert low <= float(np.median(sample)) <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


def test_median_ci_rejects_a_confidence_outside_zero_and_one() -> None:
    with pytest.raises(ValueError):
        median_ci([1.0, 2.0], confidence=1.0)


def _drifting_pair(n: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate times and baseline = ratio x candidate, both under a shared slow drift."""
    rng = np.random.default_rng(seed)
    drift = 1.0 + 0.3 * np.sin(np.linspace(0.0, 6.0, n))
    candidate = drift * rng.lognormal(0.0, 0.05, n)
    baseline = ratio * drift * rng.lognormal(0.0, 0.05, n)
    return baseline, candidate


def test_paired_ratio_recovers_a_known_ratio() -> None:
    baseline, candidate = _drifting_pair(200, 1.5, seed=3)
    r = paired_ratio_of_medians(baseline, candidate)
    assert r.ci_low <= 1.5 <= r.ci_high
    assert r.ci_low <= r.value <= r.ci_high
    assert r.value == pytest.approx(1.5, rel=0.05)
    assert r.ci_high - r.ci_low < 0.3


def test_paired_ratio_is_reproducible_for_a_seed() -> None:
    baseline, candidate = _drifting_pair(50, 2.0, seed=4)
    first = paired_ratio_of_medians(baseline, candidate, seed=11)
    assert paired_ratio_of_medians(baseline, candidate, seed=11) == first
    assert isinstance(first, Ratio)


def test_paired_ratio_needs_equal_lengths() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        paired_ratio_of_medians([1.0, 2.0], [1.0])


def _busy_spells(blocks: int, rounds: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Rounds in blocks; a block's busy spell moves the ratio (sd 10%) around 2.0."""
    rng = np.random.default_rng(seed)
    spell = np.repeat(rng.lognormal(0.0, 0.1, blocks), rounds)
    candidate = rng.lognormal(0.0, 0.05, blocks * rounds)
    baseline = 2.0 * spell * candidate * rng.lognormal(0.0, 0.05, blocks * rounds)
    return baseline, candidate, [b for b in range(blocks) for _ in range(rounds)]


def test_resampling_blocks_covers_a_ratio_that_moves_between_blocks() -> None:
    # The long-run ratio is 2.0 but each run sees 8 busy spells. An interval that treats
    # rounds as independent is far too narrow; resampling blocks keeps its promise.
    covered = {"rounds": 0, "blocks": 0}
    runs = 60
    for seed in range(runs):
        baseline, candidate, blocks = _busy_spells(8, 30, seed)
        by_round = paired_ratio_of_medians(baseline, candidate, resamples=400, seed=seed)
        by_block = paired_ratio_of_medians(
            baseline, candidate, blocks=blocks, resamples=400, seed=seed
        )
        covered["rounds"] += by_round.ci_low <= 2.0 <= by_round.ci_high
        covered["blocks"] += by_block.ci_low <= 2.0 <= by_block.ci_high
        assert by_block.value == by_round.value
    assert covered["rounds"] < 0.6 * runs
    assert covered["blocks"] >= 0.85 * runs


def test_one_block_is_the_round_bootstrap() -> None:
    baseline, candidate = _drifting_pair(40, 1.5, seed=5)
    plain = paired_ratio_of_medians(baseline, candidate, seed=2)
    assert paired_ratio_of_medians(baseline, candidate, blocks=[7] * 40, seed=2) == plain


def test_blocks_of_constant_rounds_bound_the_interval_by_their_ratios() -> None:
    # no spread within a block: every resample's ratio lies between the blocks' ratios
    baseline = [2.0] * 5 + [3.0] * 7
    r = paired_ratio_of_medians(baseline, [1.0] * 12, blocks=[0] * 5 + [1] * 7, seed=1)
    assert 2.0 <= r.ci_low < r.ci_high <= 3.0


def test_blocks_must_label_every_round() -> None:
    with pytest.raises(ValueError, match="label each of the 3 rounds"):
        paired_ratio_of_medians([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], blocks=[0, 1])


def test_mann_whitney_matches_hand_computation() -> None:
    # a = [1, 2, 3], b = [2, 3, 4]; pooled sorted 1 2 2 3 3 4 -> ranks 1 2.5 2.5 4.5 4.5 6
    # rank sum of b = 2.5 + 4.5 + 6 = 13 -> U_b = 13 - 3*4/2 = 7, U_a = 9 - 7 = 2
    # mean U = 4.5; tie term 2*(2^3 - 2) = 12; var = 9/12 * (7 - 12/30) = 4.95
    # z = (7 - 4.5 - 0.5) / sqrt(4.95); two-sided p = 2 * (1 - Phi(z)) = erfc(z / sqrt 2)
    # Cliff's delta of b over a: 6 pairs b > a, 1 pair b < a, of 9 -> 5/9; ratio 3/2
    z = 2.0 / math.sqrt(4.95)
    t = mann_whitney([1, 2, 3], [2, 3, 4])
    assert t.p_value == pytest.approx(math.erfc(z / math.sqrt(2.0)))
    assert t.effect == pytest.approx(5 / 9)
    assert t.ratio == 1.5
    assert not t.significant


@pytest.mark.parametrize("seed", range(5))
def test_mann_whitney_p_value_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(10.0, 1.0, 40).round(1)  # rounding makes ties
    b = rng.normal(10.4, 1.0, 25 + seed).round(1)
    expected = scipy_stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic")
    assert mann_whitney(a, b).p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert mann_whitney(b, a).p_value == pytest.approx(expected.pvalue, rel=1e-9)


def test_a_against_a_is_not_significant() -> None:
    rng = np.random.default_rng(5)
    t = mann_whitney(rng.lognormal(0.0, 0.1, 200), rng.lognormal(0.0, 0.1, 200))
    assert t.p_value > 0.01
    assert not t.significant


def test_a_shift_beyond_min_effect_is_significant() -> None:
    rng = np.random.default_rng(6)
    a = rng.lognormal(0.0, 0.1, 100)
    b = 1.2 * rng.lognormal(0.0, 0.1, 100)
    t = mann_whitney(a, b)
    assert t.significant
    assert t.p_value < 1e-6
    assert t.ratio == pytest.approx(1.2, rel=0.05)
    assert t.effect > 0.5  # b mostly larger


def test_a_tiny_consistent_shift_is_not_significant() -> None:
    rng = np.random.default_rng(8)
    a = rng.lognormal(0.0, 0.001, 100)
    t = mann_whitney(a, 1.02 * rng.lognormal(0.0, 0.001, 100))
    assert t.p_value < 1e-6  # certainly different...
    assert not t.significant  # ...but by 2%, under min_effect = 5%


def test_identical_samples_give_p_one() -> None:
    t = mann_whitney([1.0, 1.0, 1.0], [1.0, 1.0])
    assert (t.p_value, t.effect, t.ratio, t.significant) == (1.0, 0.0, 1.0, False)
