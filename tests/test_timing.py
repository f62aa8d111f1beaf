"""The timer: calibration against fake clocks, round counts, ABBA order, gc, a 2x workload."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable

import pytest

from qatbench.measure import timing
from qatbench.measure.timing import (
    TimingSettings,
    calibrate_calls,
    clock_resolution_ns,
    time_callable,
    time_paired,
    time_pairs,
)

QUICK = TimingSettings(warmup_s=0.01, min_round_s=0.001, min_rounds=5, max_time_s=0.05)


class FakeClock:
    """A clock advanced by ``read_ns`` per read and ``call_ns`` per call of :meth:`work`."""

    def __init__(self, read_ns: int, call_ns: int, tick_ns: int = 1) -> None:
        self.now_ns = 0
        self.read_ns, self.call_ns, self.tick_ns = read_ns, call_ns, tick_ns

    def __call__(self) -> int:
        self.now_ns += self.read_ns
        return self.now_ns // self.tick_ns * self.tick_ns

    def work(self) -> None:
        self.now_ns += self.call_ns


def test_calibration_reaches_min_round_time() -> None:
    # 1 us per call, 100 us per round -> 100 calls; growth is 1 -> 10 -> 100
    clock = FakeClock(read_ns=1, call_ns=1_000)
    assert calibrate_calls(clock.work, min_round_s=100e-6, clock=clock) == 100


def test_calibration_respects_a_coarse_clock() -> None:
    # a clock that ticks every 1 us needs rounds of >= 1000 ticks = 1 ms, not the asked 1 us
    clock = FakeClock(read_ns=1, call_ns=1_000, tick_ns=1_000)
    assert clock_resolution_ns(clock) == 1_000
    calls = calibrate_calls(clock.work, min_round_s=1e-6, clock=clock)
    assert 1_000 <= calls <= 1_100


def test_a_function_slower_than_the_round_gets_one_call() -> None:
    clock = FakeClock(read_ns=1, call_ns=10_000_000)
    assert calibrate_calls(clock.work, min_round_s=0.002, clock=clock) == 1


def test_a_call_ten_times_the_round_is_timed_once_to_calibrate() -> None:
    clock = FakeClock(read_ns=1, call_ns=20_000_000)  # 20 ms against a 2 ms round
    calls = 0

    def work() -> None:
        nonlocal calls
        calls += 1
        clock.work()

    assert calibrate_calls(work, min_round_s=0.002, clock=clock) == 1
    assert calls == 1
    # a warm-up that already saw such a call spares calibration any call at all
    assert calibrate_calls(work, 0.002, clock=clock, known_call_ns=20_000_000) == 1
    assert calls == 1
    # ... but a warm-up call near the target proves nothing: calibration times it
    assert calibrate_calls(work, 0.002, clock=clock, known_call_ns=3_000_000) == 1
    assert calls == 2


def test_a_fast_function_gets_many_calls_per_round() -> None:
    timing = time_callable(lambda: None, QUICK)
    assert timing.calls_per_round > 1
    assert len(timing.per_call_s) >= QUICK.min_rounds
    assert timing.summary.n == len(timing.per_call_s)
    assert all(t > 0 for t in timing.per_call_s)


def test_min_rounds_are_kept_even_without_budget() -> None:
    settings = TimingSettings(warmup_s=0.0, min_round_s=0.0005, min_rounds=7, max_time_s=0.0)
    assert len(time_callable(lambda: None, settings).per_call_s) == 7
    paired = time_paired(lambda: None, lambda: None, settings)
    assert len(paired.baseline.per_call_s) == len(paired.candidate.per_call_s) == 7


def test_paired_rounds_alternate_abba() -> None:
    # each call sleeps longer than a round, so every round is exactly one call;
    # calibration times each function twice with that one call
    calls: list[str] = []

    def tagged(tag: str) -> None:
        calls.append(tag)
        time.sleep(0.002)

    settings = TimingSettings(warmup_s=0.0, min_round_s=0.001, min_rounds=4, max_time_s=0.0)
    paired = time_paired(lambda: tagged("b"), lambda: tagged("c"), settings)
    assert paired.baseline.calls_per_round == paired.candidate.calls_per_round == 1
    calibration, rounds = calls[:4], calls[4:]
    assert calibration == ["b", "b", "c", "c"]
    assert rounds == ["b", "c", "c", "b", "b", "c", "c", "b"]


def test_pairs_are_timed_in_turn_one_block_each_per_repeat() -> None:
    calls: list[str] = []

    def tagged(tag: str) -> None:
        calls.append(tag)
        time.sleep(0.002)

    settings = TimingSettings(
        warmup_s=0.0, min_round_s=0.001, min_rounds=2, max_time_s=0.0, repeats=2
    )
    first, second = time_pairs(
        [
            (lambda: tagged("b1"), lambda: tagged("c1")),
            (lambda: tagged("b2"), lambda: tagged("c2")),
        ],
        settings,
    )
    calibration, blocks = calls[:8], calls[8:]
    assert calibration == ["b1", "b1", "c1", "c1", "b2", "b2", "c2", "c2"]
    # each block: an untimed round of both (they come cold from the other pair), one pair
    assert blocks == ["b1", "c1", "b1", "c1", "b2", "c2", "b2", "c2"] * 2
    for paired in (first, second):
        assert paired.repeat_of_round == (0, 1)
        assert len(paired.repeat_speedups) == 2
        assert len(paired.baseline.per_call_s) == settings.min_rounds


def test_long_rounds_back_from_another_block_get_no_untimed_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    long_tags = {"b2", "c2"}  # the second pair's rounds count as self-warming

    def tagged(tag: str) -> None:
        calls.append(tag)
        time.sleep(0.002)

    monkeypatch.setattr(timing, "SELF_WARMING_ROUND_NS", 1_000_000)  # 1 ms: both pairs
    settings = TimingSettings(
        warmup_s=0.0, min_round_s=0.001, min_rounds=3, max_time_s=0.0, repeats=3
    )
    time_pairs(
        [
            (lambda: tagged("b1"), lambda: tagged("c1")),
            (lambda: tagged("b2"), lambda: tagged("c2")),
        ],
        settings,
    )
    blocks = calls[8:]
    # the first repeat warms both (nothing measured yet); later ones time straight away
    assert blocks[:8] == ["b1", "c1", "b1", "c1", "b2", "c2", "b2", "c2"]
    assert blocks[8:] == ["b1", "c1", "b2", "c2"] * 2
    assert long_tags <= set(blocks)


def test_repeats_split_the_rounds_and_keep_min_rounds() -> None:
    settings = TimingSettings(
        warmup_s=0.0, min_round_s=0.0005, min_rounds=7, max_time_s=0.0, repeats=3
    )
    paired = time_paired(lambda: None, lambda: None, settings)
    assert paired.repeat_of_round == (0, 0, 0, 1, 1, 1, 2, 2, 2)  # ceil(7 / 3) per repeat


def test_gc_is_off_while_timing_and_restored_after() -> None:
    seen: list[bool] = []
    assert gc.isenabled()
    time_callable(lambda: seen.append(gc.isenabled()), QUICK)
    assert seen[-1] is False
    assert gc.isenabled()


def test_gc_is_restored_when_the_function_raises() -> None:
    calls = 0

    def fails_after_warm_up() -> None:
        nonlocal calls
        calls += 1
        if not gc.isenabled():
            raise RuntimeError(f"boom after {calls} calls")

    with pytest.raises(RuntimeError, match="boom"):
        time_callable(fails_after_warm_up, QUICK)
    assert gc.isenabled()


def test_gc_left_disabled_stays_disabled() -> None:
    gc.disable()
    try:
        time_callable(lambda: None, QUICK)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_twice_the_work_is_half_the_speed() -> None:
    k = 2_000
    settings = TimingSettings(warmup_s=0.05, min_round_s=0.002, min_rounds=15, max_time_s=0.6)
    for _ in range(3):  # a busy machine may spoil one run; a broken timer spoils all three
        paired = time_paired(lambda: sum(range(k)), lambda: sum(range(2 * k)), settings)
        if 0.3 < paired.speedup.value < 0.8:
            break
    speedup = paired.speedup
    assert 0.3 < speedup.value < 0.8
    assert speedup.ci_low <= speedup.value <= speedup.ci_high
    assert speedup.ci_low < 0.8 and speedup.ci_high > 0.3


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        TimingSettings(min_rounds=0)
    with pytest.raises(ValueError):
        TimingSettings(min_round_s=0.0)
    with pytest.raises(ValueError):
        TimingSettings(repeats=0)
    with pytest.raises(ValueError):
        TimingSettings(target_ci=0.0)


class _Instance:
    """A callable standing in for one copy of a model; records which repeat made it."""

    def __init__(self, calls: list[str], tag: str) -> None:
        self.calls, self.tag = calls, tag

    def __call__(self) -> None:
        self.calls.append(self.tag)
        time.sleep(0.002)  # longer than a round: one call per round


def test_pairs_made_afresh_per_repeat_time_only_that_repeats_instances() -> None:
    calls: list[str] = []
    alive_when_made: list[int] = []
    made: list[weakref.ref[_Instance]] = []

    def pairs(repeat: int) -> list[tuple[_Instance, _Instance]]:
        alive_when_made.append(sum(ref() is not None for ref in made))
        b, c = _Instance(calls, f"b{repeat}"), _Instance(calls, f"c{repeat}")
        made.extend([weakref.ref(b), weakref.ref(c)])
        return [(b, c)]

    settings = TimingSettings(
        warmup_s=0.0, min_round_s=0.001, min_rounds=3, max_time_s=0.0, repeats=3
    )
    (paired,) = time_pairs(pairs, settings)
    # the previous repeat's copies were let go before the next were made
    assert alive_when_made == [0, 0, 0]
    assert paired.repeat_of_round == (0, 1, 2)
    assert len(paired.repeat_speedups) == 3
    # each later block: an untimed round of its new instances, then its one pair
    assert [tag for tag in calls if tag[1] != "0"] == ["b1", "c1"] * 2 + ["b2", "c2"] * 2


def test_one_pair_made_afresh_and_warmed_up_is_timed_at_once() -> None:
    calls: list[str] = []

    def pairs(repeat: int) -> list[tuple[_Instance, _Instance]]:
        return [(_Instance(calls, f"b{repeat}"), _Instance(calls, f"c{repeat}"))]

    settings = TimingSettings(
        warmup_s=0.0001, min_round_s=0.001, min_rounds=3, max_time_s=0.0, repeats=3
    )
    time_pairs(pairs, settings)
    # each later set: its warm-up (one call each: a call outlasts warmup_s), then its pair,
    # no untimed round between them
    assert [tag for tag in calls if tag[1] != "0"] == ["b1", "c1", "b1", "c1"] + ["b2", "c2"] * 2


def test_a_renewal_that_changes_the_number_of_pairs_is_an_error() -> None:
    def pairs(repeat: int) -> list[tuple[Callable[[], None], Callable[[], None]]]:
        return [(lambda: None, lambda: None)] * (1 + repeat)

    settings = TimingSettings(
        warmup_s=0.0, min_round_s=1e-6, min_rounds=2, max_time_s=0.0, repeats=2
    )
    with pytest.raises(ValueError, match="repeat 1 made 2 pairs to time, not 1"):
        time_pairs(pairs, settings)


def _work(n: int) -> Callable[[], object]:
    return lambda: sum(range(n))


@pytest.mark.parametrize(
    ("target", "min_rounds", "blocks"),
    [
        (None, 3, 8),  # off: every repeat
        (1000.0, 3, 3),  # a target any interval meets: stops as soon as it may
        (1000.0, 6, 6),  # ... but not before min_rounds rounds (one per block here)
        (1e-9, 3, 8),  # an unreachable target: every repeat, max_time_s is the cap
    ],
)
def test_a_target_interval_stops_timing_once_every_pair_meets_it(
    target: float | None, min_rounds: int, blocks: int
) -> None:
    settings = TimingSettings(
        warmup_s=0.0,
        min_round_s=0.0005,
        min_rounds=min_rounds,
        max_time_s=0.0,
        repeats=8,
        target_ci=target,
    )
    pairs = [(_work(4000), _work(2000)), (_work(3000), _work(3000))]
    for paired in time_pairs(pairs, settings):
        assert max(paired.repeat_of_round) + 1 == blocks
        assert len(paired.repeat_speedups) == blocks
