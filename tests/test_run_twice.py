"""benchmarks/run_twice.py: the trial-by-trial agreement of two runs of an experiment."""

from __future__ import annotations

from typing import Any

from benchmarks import run_twice


def _report(**speedups: float) -> dict[str, Any]:
    return {
        "trials": [
            {
                "id": tid,
                "metrics": {
                    "speedup_vs_fp32_b1": v,
                    "speedup_ci_low_b1": v * 0.9,
                    "speedup_ci_high_b1": v * 1.1,
                },
            }
            for tid, v in speedups.items()
        ]
    }


def test_agreement_counts_trials_within_the_tolerance_of_the_smaller_value() -> None:
    a = _report(same=2.0, near=2.0, far=2.0, only_a=1.0)
    b = _report(same=2.0, near=2.19, far=2.21, only_b=1.0)
    found = run_twice.agreement(a, b, "speedup_vs_fp32_b1", 0.10)
    assert (found.agreeing, found.compared) == (2, 3)  # trials in only one run are not compared
    by_id = {line.split()[0]: line for line in found.lines}
    assert "9.5% ok" in by_id["near"]
    assert "10.5% MISS" in by_id["far"]
    assert "2.000 [1.80, 2.20]" in by_id["same"]  # each run's value with its interval


def test_intervals_are_told_apart_from_overlapping() -> None:
    a = _report(close=2.0, drifted=2.0)  # intervals are the value -10% / +10%
    b = _report(close=2.3, drifted=2.5)  # [2.07, 2.53] meets [1.8, 2.2]; [2.25, 2.75] does not
    found = run_twice.agreement(a, b, "speedup_vs_fp32_b1", 0.10)
    by_id = {line.split()[0]: line for line in found.lines}
    assert by_id["close"].endswith("MISS overlap")
    assert by_id["drifted"].endswith("MISS apart")
    assert (found.overlapping, found.with_intervals) == (1, 2)


def test_a_metric_without_an_interval_is_shown_bare() -> None:
    a = {"trials": [{"id": "t", "metrics": {"mse": 1.0}}]}
    b = {"trials": [{"id": "t", "metrics": {"mse": 1.5}}]}
    found = run_twice.agreement(a, b, "mse", 0.10)
    assert (found.agreeing, found.compared, found.with_intervals) == (0, 1, 0)
    assert found.lines[0].split()[1:5] == ["1.000", "1.500", "50.0%", "MISS"]
