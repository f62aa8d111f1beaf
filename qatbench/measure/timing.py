"""Timing of zero-argument callables: warm-up, calibrated rounds, paired ABBA rounds.

A round calls the function ``calls_per_round`` times between two reads of the monotonic
``time.perf_counter_ns`` clock; one sample is the round's time divided by its calls, so a
sample is long compared with the clock's resolution even for a microsecond call. Garbage
collection is collected beforehand and disabled while calibrating and timing, so a
collection triggered by some earlier allocation does not land in one round. The timer knows
nothing of models: the caller wraps whatever it measures in a closure.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat

from qatbench.measure.stats import Ratio, Summary, paired_ratio_of_medians, summarize

Clock = Callable[[], int]
_NS_PER_S = 1_000_000_000
_RESOLUTION_MULTIPLE = 1000  # a round lasts at least this many clock ticks
_RESOLUTION_PROBES = 200
_MAX_GROWTH = 10  # calibration grows calls per round by at most this factor per try


@dataclass(frozen=True)
class TimingSettings:
    """How long to warm up and measure.

    ``warmup_s`` is spent calling each function before calibration; a round lasts at least
    ``min_round_s``; rounds continue until ``min_rounds`` are done and the next round would
    exceed ``max_time_s``, the budget of the timed rounds (warm-up and calibration come on
    top). ``min_rounds`` is honoured even when it overruns the budget.
    """

    warmup_s: float = 0.2
    min_round_s: float = 0.002
    min_rounds: int = 15
    max_time_s: float = 4.0

    def __post_init__(self) -> None:
        if self.warmup_s < 0 or self.max_time_s < 0:
            raise ValueError(f"warmup_s and max_time_s must not be negative: {self}")
        if self.min_round_s <= 0:
            raise ValueError(f"min_round_s must be positive: {self}")
        if self.min_rounds < 1:
            raise ValueError(f"min_rounds must be at least 1: {self}")


@dataclass(frozen=True)
class Timing:
    """Per-call seconds of every round of one function, and their summary."""

    per_call_s: tuple[float, ...]
    calls_per_round: int
    summary: Summary


@dataclass(frozen=True)
class PairedTiming:
    """Two functions timed in alternating rounds; ``speedup`` = baseline / candidate."""

    baseline: Timing
    candidate: Timing
    speedup: Ratio


def clock_resolution_ns(clock: Clock = time.perf_counter_ns) -> int:
    """Smallest non-zero step observed between consecutive reads of ``clock``.

    The observed step includes the cost of reading the clock, so it is the honest
    resolution of a timed interval, usually coarser than ``time.get_clock_info``'s figure.
    """
    steps = []
    for _ in range(_RESOLUTION_PROBES):
        start = clock()
        end = clock()
        while end == start:
            end = clock()
        steps.append(end - start)
    return min(steps)


def _round_ns(fn: Callable[[], object], calls: int, clock: Clock = time.perf_counter_ns) -> int:
    start = clock()
    for _ in repeat(None, calls):
        fn()
    return clock() - start


def calibrate_calls(
    fn: Callable[[], object], min_round_s: float, clock: Clock = time.perf_counter_ns
) -> int:
    """Calls per round so one round lasts >= ``min_round_s`` and >= 1000 clock ticks.

    Times rounds of growing length (at most 10x per try, aiming 10% past the target) and
    returns the first call count whose round reached the target; a function slower than the
    target gets 1. Each count is timed twice and the faster round counts, so one round
    stretched by a busy machine does not end the search early.
    """
    target_ns = max(min_round_s * _NS_PER_S, _RESOLUTION_MULTIPLE * clock_resolution_ns(clock))
    calls = 1
    while (elapsed_ns := min(_round_ns(fn, calls, clock) for _ in range(2))) < target_ns:
        wanted = math.ceil(calls * 1.1 * target_ns / elapsed_ns) if elapsed_ns > 0 else math.inf
        calls = int(min(max(wanted, calls + 1), calls * _MAX_GROWTH))
    return calls


def _warm_up(fn: Callable[[], object], seconds: float) -> None:
    deadline_ns = time.perf_counter_ns() + seconds * _NS_PER_S
    while time.perf_counter_ns() < deadline_ns:
        fn()


@contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _fits(start_ns: int, next_ns: int, budget_ns: float) -> bool:
    """Whether a step as long as ``next_ns`` still ends within the budget begun at start."""
    return time.perf_counter_ns() - start_ns + next_ns <= budget_ns


def _timing(round_ns: list[int], calls: int) -> Timing:
    per_call_s = tuple(ns / calls / _NS_PER_S for ns in round_ns)
    return Timing(per_call_s=per_call_s, calls_per_round=calls, summary=summarize(per_call_s))


def time_callable(fn: Callable[[], object], settings: TimingSettings) -> Timing:
    """Warm ``fn`` up, calibrate its round and time rounds within the settings' budget."""
    _warm_up(fn, settings.warmup_s)
    budget_ns = settings.max_time_s * _NS_PER_S
    rounds: list[int] = []
    with _gc_paused():
        calls = calibrate_calls(fn, settings.min_round_s)
        start_ns = time.perf_counter_ns()
        while len(rounds) < settings.min_rounds or _fits(start_ns, rounds[-1], budget_ns):
            rounds.append(_round_ns(fn, calls))
    return _timing(rounds, calls)


def time_paired(
    baseline_fn: Callable[[], object],
    candidate_fn: Callable[[], object],
    settings: TimingSettings,
) -> PairedTiming:
    """Time two functions in alternating rounds so machine drift hits both alike.

    Each function is warmed up and calibrated on its own; then pairs of rounds run in ABBA
    order (baseline, candidate, candidate, baseline, ...) until both have ``min_rounds``
    rounds and the next pair would exceed ``max_time_s``. Round i of the baseline and round
    i of the candidate form the pair that the speed-up's paired bootstrap resamples.
    """
    _warm_up(baseline_fn, settings.warmup_s)
    _warm_up(candidate_fn, settings.warmup_s)
    budget_ns = settings.max_time_s * _NS_PER_S
    base_rounds: list[int] = []
    cand_rounds: list[int] = []
    with _gc_paused():
        base_calls = calibrate_calls(baseline_fn, settings.min_round_s)
        cand_calls = calibrate_calls(candidate_fn, settings.min_round_s)
        start_ns = time.perf_counter_ns()
        while len(base_rounds) < settings.min_rounds or _fits(
            start_ns, base_rounds[-1] + cand_rounds[-1], budget_ns
        ):
            if len(base_rounds) % 2 == 0:
                base_rounds.append(_round_ns(baseline_fn, base_calls))
                cand_rounds.append(_round_ns(candidate_fn, cand_calls))
            else:
                cand_rounds.append(_round_ns(candidate_fn, cand_calls))
                base_rounds.append(_round_ns(baseline_fn, base_calls))
    baseline = _timing(base_rounds, base_calls)
    candidate = _timing(cand_rounds, cand_calls)
    speedup = paired_ratio_of_medians(baseline.per_call_s, candidate.per_call_s)
    return PairedTiming(baseline=baseline, candidate=candidate, speedup=speedup)
