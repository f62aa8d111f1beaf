"""The self-test's detection power: A/A false alarms, detections of a real slowdown, and the
smallest slowdown this machine sees, over fresh processes."""

from __future__ import annotations

import math
import random

from qatbench.measure.power import PAIRS, judge, measure_power, pairs_of


def _runs(n: int, between_sd: float, within_sd: float, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    runs = []
    for _ in range(n):
        level = 1.0 + rng.gauss(0, between_sd)
        runs.append(
            {
                "ref": [level * (1 + rng.gauss(0, within_sd)) for _ in range(8)],
                "slow": [1.1 * level * (1 + rng.gauss(0, within_sd)) for _ in range(8)],
            }
        )
    return runs


def test_pairs_spread_over_every_process() -> None:
    pairs = pairs_of(8)[:PAIRS]
    assert len(set(pairs)) == PAIRS
    assert {i for p in pairs for i in p} == set(range(8))


def test_a_quiet_machine_sees_small_slowdowns_without_false_alarms() -> None:
    power = judge(_runs(8, between_sd=0.003, within_sd=0.003))
    assert power.false_alarms == 0 and power.detections == 20
    assert 0.05 <= power.min_detectable <= 0.07
    assert "0 of 20 false alarms" in power.sentence()


def test_a_noisy_machine_says_it_cannot_see_small_slowdowns() -> None:
    power = judge(_runs(8, between_sd=0.08, within_sd=0.01, seed=3))
    assert power.min_detectable > 0.10 or not math.isfinite(power.min_detectable)
    assert power.detections < 19


def test_measured_across_fresh_processes() -> None:
    power = measure_power(processes=3, block_s=0.005, repeats=6)
    assert power.processes == 3 and power.pairs == 3
    assert power.detections + power.false_alarms <= 6
    assert power.between_process_sd >= 0.0
