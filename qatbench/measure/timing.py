"""Timing of zero-argument callables: warm-up, calibrated rounds, paired ABBA rounds.

Paired rounds are taken in ``repeats`` blocks. On a shared machine a busy spell lasts
longer than a round (on the 2-core VM this was written on, a second or more) and moves a
speed-up by more than its rounds' spread: one contiguous block of rounds gives an interval
that is too narrow and a value that depends on when it ran. Several pairs (batch sizes, a
second baseline) are therefore timed in turn, one block each, so every pair's rounds are
spread over the whole measurement, and the speed-up's interval resamples blocks.

Where the objects being timed lie in memory moves a speed too: on that VM, copies of one
eager fp32 model timed against each other differed by up to 5%, and a fresh onnxruntime
session of the same file ran 1-6% faster than the one a trial had used for its evaluation.
Such an offset is fixed for the life of the objects, so within one process it looks like
signal: no number of rounds averages it out, and the interval cannot see it. The caller may
therefore pass a function that makes the pairs afresh for every repeat (new copies, new
sessions), so the offset varies from block to block like the machine's state does, is
averaged over the repeats, and enters the interval through the block bootstrap.

A round calls the function ``calls_per_round`` times between two reads of the monotonic
``time.perf_counter_ns`` clock; one sample is the round's time divided by its calls, so a
sample is long compared with the clock's resolution even for a microsecond call. Garbage
collection is collected beforehand and disabled while calibrating and timing, so a
collection triggered by some earlier allocation does not land in one round. The timer knows
nothing of models: the caller wraps whatever it measures in a closure.
"""

from __future__ import annotations

import functools
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import repeat
from typing import cast

from qatbench.measure.stats import Ratio, Summary, paired_ratio_of_medians, summarize

Clock = Callable[[], int]
_NS_PER_S = 1_000_000_000
# A round at least this long needs no untimed round when it comes back from another pair's
# block (objects made afresh for a repeat always get one: their first call may build caches).
SELF_WARMING_ROUND_NS = 100_000_000
_RESOLUTION_MULTIPLE = 1000  # a round lasts at least this many clock ticks
_RESOLUTION_PROBES = 200
_MAX_GROWTH = 10  # calibration grows calls per round by at most this factor per try
CLEARLY_LONG = 10  # a call this many times the round's target is timed once to calibrate


@dataclass(frozen=True)
class TimingSettings:
    """How long to warm up and measure.

    ``warmup_s`` is spent calling each function before calibration; a round lasts at least
    ``min_round_s``; rounds continue until ``min_rounds`` are done and the next round would
    exceed ``max_time_s``, the budget of the timed rounds (warm-up and calibration come on
    top). ``min_rounds`` is honoured even when it overruns the budget. Paired timing splits
    the rounds and the budget into ``repeats`` blocks (see the module's docstring).

    ``target_ci`` (a fraction, e.g. 0.05) ends paired timing early: once
    ``MIN_ADAPTIVE_REPEATS`` blocks and ``min_rounds`` rounds are done, it stops after the
    first block at which every pair's 95% interval lies within ``target_ci`` of its
    speed-up on both sides. ``max_time_s`` stays the cap; a quiet machine spends less.
    """

    warmup_s: float = 0.2
    min_round_s: float = 0.002
    min_rounds: int = 15
    max_time_s: float = 4.0
    repeats: int = 1
    target_ci: float | None = None

    def __post_init__(self) -> None:
        if self.warmup_s < 0 or self.max_time_s < 0:
            raise ValueError(f"warmup_s and max_time_s must not be negative: {self}")
        if self.min_round_s <= 0:
            raise ValueError(f"min_round_s must be positive: {self}")
        if self.min_rounds < 1:
            raise ValueError(f"min_rounds must be at least 1: {self}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1: {self}")
        if self.target_ci is not None and self.target_ci <= 0:
            raise ValueError(f"target_ci must be positive: {self}")


@dataclass(frozen=True)
class Timing:
    """Per-call seconds of every round of one function, and their summary."""

    per_call_s: tuple[float, ...]
    calls_per_round: int
    summary: Summary


@dataclass(frozen=True)
class PairedTiming:
    """Two functions timed in alternating rounds; ``speedup`` = baseline / candidate.

    ``repeat_of_round[i]`` is the block round i was timed in; ``repeat_speedups`` the
    ratio of medians within each block, in time order.
    """

    baseline: Timing
    candidate: Timing
    repeat_of_round: tuple[int, ...]
    repeat_speedups: tuple[float, ...]

    @functools.cached_property
    def speedup(self) -> Ratio:
        """The ratio of medians with its block-bootstrap interval, computed when first read:
        the bootstrap takes about half a second for 2000 rounds, and a trial computes its
        metrics from the rounds as plain data (measure/latency_metrics.py) instead."""
        return paired_ratio_of_medians(
            self.baseline.per_call_s, self.candidate.per_call_s, blocks=self.repeat_of_round
        )


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
    fn: Callable[[], object],
    min_round_s: float,
    clock: Clock = time.perf_counter_ns,
    known_call_ns: int | None = None,
) -> int:
    """Calls per round so one round lasts >= ``min_round_s`` and >= 1000 clock ticks.

    Times rounds of growing length (at most 10x per try, aiming 10% past the target) and
    returns the first call count whose round reached the target; a function slower than the
    target gets 1. Each count is timed twice and the faster round counts, so one round
    stretched by a busy machine does not end the search early; a single call of
    ``CLEARLY_LONG`` times the target needs no second look (a busy spell does not stretch
    a call tenfold), and neither does a function whose fastest warm-up call
    (``known_call_ns``) was that long: a decode of many tokens is not called again for it.
    """
    target_ns = max(min_round_s * _NS_PER_S, _RESOLUTION_MULTIPLE * clock_resolution_ns(clock))
    if known_call_ns is not None and known_call_ns >= CLEARLY_LONG * target_ns:
        return 1
    calls = 1
    while (elapsed_ns := _probe_ns(fn, calls, target_ns, clock)) < target_ns:
        wanted = math.ceil(calls * 1.1 * target_ns / elapsed_ns) if elapsed_ns > 0 else math.inf
        calls = int(min(max(wanted, calls + 1), calls * _MAX_GROWTH))
    return calls


def _probe_ns(fn: Callable[[], object], calls: int, target_ns: float, clock: Clock) -> int:
    """The faster of two rounds of ``calls`` calls, or the one where it is clearly long."""
    first_ns = _round_ns(fn, calls, clock)
    if first_ns >= CLEARLY_LONG * target_ns:
        return first_ns
    return min(first_ns, _round_ns(fn, calls, clock))


def _warm_up(fn: Callable[[], object], seconds: float) -> int | None:
    """Call ``fn`` for ``seconds``; the fastest call's nanoseconds (None if none was made)."""
    deadline_ns = time.perf_counter_ns() + seconds * _NS_PER_S
    fastest_ns: int | None = None
    while (now_ns := time.perf_counter_ns()) < deadline_ns:
        fn()
        took_ns = time.perf_counter_ns() - now_ns
        fastest_ns = took_ns if fastest_ns is None else min(fastest_ns, took_ns)
    return fastest_ns


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
    fastest_ns = _warm_up(fn, settings.warmup_s)
    budget_ns = settings.max_time_s * _NS_PER_S
    rounds: list[int] = []
    with _gc_paused():
        calls = calibrate_calls(fn, settings.min_round_s, known_call_ns=fastest_ns)
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

    See :func:`time_pairs`, of which this is the one-pair case.
    """
    return time_pairs([(baseline_fn, candidate_fn)], settings)[0]


Pair = tuple[Callable[[], object], Callable[[], object]]


@dataclass
class _PairRounds:
    baseline_fn: Callable[[], object]
    candidate_fn: Callable[[], object]
    base_calls: int
    cand_calls: int
    base: list[int] = field(default_factory=list)  # round nanoseconds
    cand: list[int] = field(default_factory=list)
    repeat: list[int] = field(default_factory=list)  # the block of each round
    # the fastest warm-up call of each function (None: the warm-up made no call)
    base_warm_ns: int | None = None
    cand_warm_ns: int | None = None

    def warm_up(self, seconds: float) -> None:
        self.base_warm_ns = _warm_up(self.baseline_fn, seconds)
        self.cand_warm_ns = _warm_up(self.candidate_fn, seconds)

    def warmed(self) -> bool:
        """Whether the last warm-up called both functions."""
        return self.base_warm_ns is not None and self.cand_warm_ns is not None

    def warms_itself(self) -> bool:
        """Whether both functions' rounds are so long (a generation of many tokens) that
        the cache state another pair's block left behind is a rounding error of them: the
        untimed round before this pair's block would only double its cost."""
        return bool(self.base) and min(self.base[-1], self.cand[-1]) >= SELF_WARMING_ROUND_NS

    def one_pair(self, baseline_first: bool) -> int:
        """Time one baseline and one candidate round; their total nanoseconds."""
        if baseline_first:
            self.base.append(_round_ns(self.baseline_fn, self.base_calls))
            self.cand.append(_round_ns(self.candidate_fn, self.cand_calls))
        else:
            self.cand.append(_round_ns(self.candidate_fn, self.cand_calls))
            self.base.append(_round_ns(self.baseline_fn, self.base_calls))
        return self.base[-1] + self.cand[-1]

    def result(self) -> PairedTiming:
        baseline = _timing(self.base, self.base_calls)
        candidate = _timing(self.cand, self.cand_calls)
        per_repeat = []
        for r in dict.fromkeys(self.repeat):
            rounds = [i for i, k in enumerate(self.repeat) if k == r]
            b = statistics.median(baseline.per_call_s[i] for i in rounds)
            per_repeat.append(b / statistics.median(candidate.per_call_s[i] for i in rounds))
        return PairedTiming(
            baseline=baseline,
            candidate=candidate,
            repeat_of_round=tuple(self.repeat),
            repeat_speedups=tuple(per_repeat),
        )


def time_pairs(
    pairs: Sequence[Pair] | Callable[[int], Sequence[Pair]], settings: TimingSettings
) -> list[PairedTiming]:
    """Time (baseline, candidate) pairs in alternating rounds, spread over ``repeats`` blocks.

    Every function is warmed up and calibrated first. Then, ``repeats`` times, each pair in
    turn gets one block: with several pairs, an untimed round of each function (it comes
    cold from another pair's block; not for functions whose last rounds took
    ``SELF_WARMING_ROUND_NS`` or more), then pairs of rounds in ABBA order (baseline,
    candidate, candidate, baseline, ...) for its share of the budget,
    ``max_time_s / repeats``, and at least ``ceil(min_rounds / repeats)`` pairs. Each pair
    ends with at least ``min_rounds`` rounds and spends about ``max_time_s``. Round i of
    the baseline and round i of the candidate form the pair that the speed-up's bootstrap
    resamples, block by block.

    ``pairs`` may instead be a function of the repeat's index that makes the pairs afresh
    (see the module's docstring): it is called once per repeat, after the previous
    repeat's functions are let go (so at most one set of copies is alive), and must return
    as many pairs, in the same order. Calls per round stay those calibrated on the first
    set; each later set is warmed up for ``warmup_s / repeats`` (at least one call each,
    where ``warmup_s`` is set), so a single pair's block starts timing at once; with
    several pairs, or without warm-up, a new set starts its block with an untimed round.
    """
    renew = pairs if callable(pairs) else None
    block_budget_ns = settings.max_time_s * _NS_PER_S / settings.repeats
    block_min_pairs = math.ceil(settings.min_rounds / settings.repeats)
    first = renew(0) if renew is not None else cast(Sequence[Pair], pairs)
    timed = [_PairRounds(b, c, 0, 0) for b, c in first]
    del first  # the pairs live in ``timed`` only, so _renew can let them go
    for p in timed:
        p.warm_up(settings.warmup_s)
    with _gc_paused():
        for p in timed:
            p.base_calls = calibrate_calls(
                p.baseline_fn, settings.min_round_s, known_call_ns=p.base_warm_ns
            )
            p.cand_calls = calibrate_calls(
                p.candidate_fn, settings.min_round_s, known_call_ns=p.cand_warm_ns
            )
        for repeat in range(settings.repeats):
            renewed = renew is not None and repeat > 0
            if renew is not None and repeat > 0:
                _renew(timed, renew, repeat, settings.warmup_s / settings.repeats)
            for p in timed:
                new_and_cold = renewed and not p.warmed()
                if new_and_cold or (len(timed) > 1 and not p.warms_itself()):
                    _round_ns(p.baseline_fn, p.base_calls)  # new, or cold from another block
                    _round_ns(p.candidate_fn, p.cand_calls)
                start_ns = time.perf_counter_ns()
                last_ns = 0
                done = 0
                while done < block_min_pairs or _fits(start_ns, last_ns, block_budget_ns):
                    last_ns = p.one_pair(baseline_first=done % 2 == 0)
                    p.repeat.append(repeat)
                    done += 1
            if _precise_enough(timed, repeat + 1, settings):
                break
    return [p.result() for p in timed]


MIN_ADAPTIVE_REPEATS = 3  # blocks before an interval is trusted to stop on


def _precise_enough(timed: list[_PairRounds], repeats_done: int, settings: TimingSettings) -> bool:
    """Whether ``settings.target_ci`` is set and met by every pair after this block."""
    target = settings.target_ci
    if target is None or repeats_done < MIN_ADAPTIVE_REPEATS or repeats_done == settings.repeats:
        return False
    if any(len(p.base) < settings.min_rounds for p in timed):
        return False
    for p in timed:
        ratio = p.result().speedup  # the interval the trial would report if it stopped now
        if ratio.ci_high > ratio.value * (1 + target) or ratio.ci_low < ratio.value * (1 - target):
            return False
    return True


def _let_go() -> None:
    """Stands in for a function whose objects were let go before the next repeat's."""


def _renew(
    timed: list[_PairRounds], renew: Callable[[int], Sequence[Pair]], repeat: int, warmup_s: float
) -> None:
    """Swap every pair's functions for the ones ``renew`` makes for this repeat."""
    for p in timed:
        p.baseline_fn = p.candidate_fn = _let_go
    fresh = list(renew(repeat))
    if len(fresh) != len(timed):
        raise ValueError(f"repeat {repeat} made {len(fresh)} pairs to time, not {len(timed)}")
    for p, (b, c) in zip(timed, fresh, strict=True):
        p.baseline_fn, p.candidate_fn = b, c
        p.warm_up(warmup_s)
