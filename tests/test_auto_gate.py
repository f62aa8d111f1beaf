"""``--gate METRIC:auto``: each trial's threshold from its own spread in history, the breach
line naming the threshold and its source; change points over a whole series."""

from __future__ import annotations

import math
import random

import pytest

from qatbench.errors import ConfigError
from qatbench.report.auto_gate import (
    DEFAULT_LIMIT,
    FLOOR,
    auto_thresholds,
    fallback_threshold,
)
from qatbench.report.compare import compare, parse_gate
from qatbench.report.history import history, history_json
from qatbench.report.sources import Sweep
from qatbench.report.steps import detect_steps
from qatbench.results import RunRecord, TrialResult

METRIC = "accuracy"  # a metric without samples: the threshold alone decides


def _trial(tid: str, value: float, metric: str = METRIC) -> TrialResult:
    return TrialResult(tid, "mlp", "ptq", "w8a8", "torch", "finished", metrics={metric: value})


def _record(values: dict[str, float], metric: str = METRIC) -> RunRecord:
    return RunRecord(
        experiment={"name": "x"},
        created="2026-01-01T00:00:00+00:00",
        env={},
        trials=tuple(_trial(t, v, metric) for t, v in values.items()),
    )


def _sweeps(series: dict[str, list[float]], metric: str = METRIC) -> list[Sweep]:
    n = len(next(iter(series.values())))
    return [
        Sweep(
            f"s{i}",
            f"2026-01-{i + 1:02d}T02:00:00+00:00",
            tuple(_trial(t, v[i], metric) for t, v in series.items()),
            {},
        )
        for i in range(n)
    ]


def test_auto_gate_takes_the_worse_direction_of_its_metric() -> None:
    assert parse_gate("speedup_vs_fp32:auto").sign == -1
    assert parse_gate("latency_p50_ms:auto").sign == 1
    assert parse_gate("accuracy:AUTO").auto
    with pytest.raises(ConfigError, match="better direction"):
        parse_gate("my_metric:auto")


def test_each_trial_gets_its_own_threshold_from_its_spread() -> None:
    rng = random.Random(0)
    quiet = [100 * (1 + rng.gauss(0, 0.005)) for _ in range(10)]
    noisy = [100 * (1 + rng.gauss(0, 0.06)) for _ in range(10)]
    found = auto_thresholds(
        _sweeps({"quiet": quiet, "noisy": noisy}), [METRIC], fallback_threshold(None)
    )
    assert found.get("quiet", METRIC).limit == FLOOR  # 3 x sqrt2 x 0.5% is under the floor
    assert found.get("noisy", METRIC).limit > 0.15
    assert "over the last 10 sweeps" in found.get("noisy", METRIC).source
    assert found.get("new", METRIC).limit == DEFAULT_LIMIT  # no history, no selftest
    assert fallback_threshold(0.07, "run x").limit == pytest.approx(0.07)


def test_auto_gate_breaches_on_the_quiet_trial_only_and_says_why() -> None:
    history_ = _sweeps(
        {"quiet": [100.0, 100.2, 99.9, 100.1, 100.0], "noisy": [100, 80, 115, 92, 108]}
    )
    thresholds = auto_thresholds(history_, [METRIC], fallback_threshold(None))
    before = _record({"quiet": 100.0, "noisy": 100.0})
    after = _record({"quiet": 90.0, "noisy": 90.0})  # both drop 10%
    result = compare(before, after, [parse_gate("accuracy:auto")], thresholds=thresholds)
    assert not result.ok
    (line,) = result.breaches
    assert line.startswith("quiet: accuracy")
    assert "accuracy:auto (threshold -5.0%: floor; spread" in line
    unchanged = compare(before, before, [parse_gate("accuracy:auto")], thresholds=thresholds)
    assert unchanged.ok


def test_auto_gate_without_thresholds_uses_the_default() -> None:
    result = compare(_record({"a": 100.0}), _record({"a": 85.0}), [parse_gate("accuracy:auto")])
    (line,) = result.breaches
    assert "no history and no selftest" in line


def test_steps_are_found_at_the_right_point_and_not_in_noise() -> None:
    rng = random.Random(1)
    flat = [10 * (1 + rng.gauss(0, 0.01)) for _ in range(20)]
    assert detect_steps(flat) == []
    stepped = flat[:12] + [v * 1.10 for v in flat[12:]]
    (step,) = detect_steps(stepped)
    assert step.at == 12
    assert step.change == pytest.approx(0.10, abs=0.02)
    # 2.5% a night for 6 nights: no point moves by 5%, the level moves by 15%
    creep = flat[:8] + [flat[8 + i] * (1 + 0.025 * (i + 1)) for i in range(6)]
    creep += [v * 1.15 for v in flat[14:]]
    steps = detect_steps(creep)
    assert steps and all(8 <= s.at <= 14 for s in steps)
    assert sum(s.change for s in steps) > 0.08


def test_history_marks_the_step_in_its_json() -> None:
    values = [5.0, 5.05, 4.98, 5.02, 5.0, 5.6, 5.62, 5.58, 5.61]
    hist = history("x", _sweeps({"t": values}, "latency_p50_ms_b1"), "latency_p50_ms_b1")
    (series,) = hist.series
    assert series.step_sweeps() == [5]
    data = history_json(hist)
    (step,) = data["series"][0]["steps"]
    assert step["sweep"] == "s5" and step["sweep_index"] == 5
    assert math.isclose(step["after"], 5.6025)


def test_without_history_the_latest_selftest_of_the_store_sets_the_threshold(
    tmp_path,
) -> None:
    from qatbench.cli.auto_gates import SELFTEST_EXPERIMENT, SELFTEST_METRIC, selftest_fallback
    from qatbench.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert "no selftest" in selftest_fallback(uri).source  # no such experiment yet
    tracker = Tracker(uri, SELFTEST_EXPERIMENT)
    tracker.log_run("selftest", metrics={SELFTEST_METRIC: 0.12})
    found = selftest_fallback(uri)
    assert found.limit == pytest.approx(0.12)
    assert "selftest run" in found.source and "12.0%" in found.source
    assert selftest_fallback(None).limit == DEFAULT_LIMIT  # two report.json files: no store
