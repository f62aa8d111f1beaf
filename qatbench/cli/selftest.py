"""``qatbench selftest``: does this machine measure what it should, right now?

Three checks, each a pass/fail with the measured value:

- ``timer_resolution_ns``: the observed step of the monotonic clock (expected <= 1 us).
- ``known_ratio``: a function doing twice the work of another, timed in paired rounds,
  must come out about half as fast (speed-up within 0.35-0.70 of the expected 0.5).
- ``aa_paired`` and ``aa_rank_test``: a function against itself must not look faster or
  slower: the paired speed-up within 10% of 1, and two independent timing runs of it, each
  in REPEATS blocks, not flagged by the rank test ``qatbench compare`` uses on them (one
  median per block; see :func:`qatbench.report.compare_samples.comparable_samples`).

Then the detection power across fresh processes (:mod:`qatbench.measure.power`): the A/A
false alarms, the detections of a real 10% slowdown and the smallest slowdown this machine
detects in 19 of 20 nightlies, which ``--gate METRIC:auto`` takes for trials without history.

Nightly jobs run it first: a failing self-test means the night's timings are not to be
trusted, whatever they show.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from qatbench.measure.power import Power
from qatbench.measure.stats import mann_whitney
from qatbench.measure.timing import (
    TimingSettings,
    clock_resolution_ns,
    time_callable,
    time_paired,
)

WORK = 20_000  # sum(range(WORK)) takes a few hundred microseconds in CPython
REPEATS = 8  # blocks per timing run of the A/A rank test, as measure.repeats


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    expected: str
    passed: bool


def busy_work(n: int) -> int:
    """CPU-bound pure Python: the time grows linearly with ``n``."""
    return sum(range(n))


def run_selftest(settings: TimingSettings | None = None) -> list[Check]:
    """Run the checks; ``settings`` bound each timing (defaults suit a 2-core machine)."""
    settings = settings or TimingSettings(
        warmup_s=0.1, min_round_s=0.005, min_rounds=20, max_time_s=1.5
    )
    checks = []
    resolution = clock_resolution_ns()
    checks.append(Check("timer_resolution_ns", resolution, "<= 1000", resolution <= 1000))

    ratio = time_paired(lambda: busy_work(WORK), lambda: busy_work(2 * WORK), settings).speedup
    checks.append(
        Check("known_ratio", ratio.value, "0.35 .. 0.70 (2x the work)", 0.35 <= ratio.value <= 0.70)
    )

    same = time_paired(lambda: busy_work(WORK), lambda: busy_work(WORK), settings).speedup
    checks.append(Check("aa_paired", same.value, "0.90 .. 1.10", 0.90 <= same.value <= 1.10))

    checks.append(aa_rank_check(lambda: busy_work(WORK), lambda: busy_work(WORK), settings))
    return checks


def block_medians(fn: Callable[[], object], settings: TimingSettings) -> list[float]:
    """One timing run of ``fn`` in REPEATS blocks sharing the budget: each block's median."""
    block = replace(
        settings,
        max_time_s=settings.max_time_s / REPEATS,
        min_rounds=math.ceil(settings.min_rounds / REPEATS),
    )
    medians = [time_callable(fn, block).summary.median]
    block = replace(block, warmup_s=0.0)  # warm already
    medians += [time_callable(fn, block).summary.median for _ in range(REPEATS - 1)]
    return medians


def aa_rank_check(
    fn_a: Callable[[], object], fn_b: Callable[[], object], settings: TimingSettings
) -> Check:
    """Two timing runs, of ``fn_a`` then ``fn_b``, judged as ``compare`` judges two runs;
    passes when the rank test does not flag them (as it must not for the same function)."""
    test = mann_whitney(block_medians(fn_a, settings), block_medians(fn_b, settings))
    return Check(
        "aa_rank_test",
        test.p_value,
        f"not significant over {REPEATS} blocks (p >= 0.01 or shift < 5%)",
        not test.significant,
    )


def as_metrics(checks: list[Check]) -> dict[str, float]:
    metrics = {f"selftest_{c.name}": float(c.value) for c in checks}
    metrics["selftest_passed"] = float(all(c.passed for c in checks))
    return metrics


def as_rows(checks: list[Check]) -> list[dict[str, object]]:
    return [asdict(c) for c in checks]


def power_metrics(power: Power) -> dict[str, float]:
    """The detection power as MLflow metrics (min_detectable is -1 when nothing was seen)."""
    seen = power.min_detectable if math.isfinite(power.min_detectable) else -1.0
    return {
        "selftest_min_detectable_slowdown": seen,
        "selftest_aa_false_alarms": float(power.false_alarms),
        "selftest_detections": float(power.detections),
        "selftest_pairs": float(power.pairs),
        "selftest_between_process_sd": power.between_process_sd,
    }
