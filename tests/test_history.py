"""Sweeps from MLflow, history with significant changes marked, and the MLflow-backed CLI.

One real SQLite store in a temporary folder serves the module: experiment ``nightly`` holds
three sweeps logged with qatbench.tracking.tracker.Tracker (tagged ``qatbench.sweep``): two from
the same latency distribution, then a 20% regression; ``untagged`` holds the same three
without the tag, grouped by time.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qatbench.errors import ConfigError
from qatbench.report.history import history, parse_threshold
from qatbench.report.pages import history_view
from qatbench.report.sources import (
    SWEEP_TAG,
    Sweep,
    group_sweeps,
    load_sweeps,
    parse_source,
    sweeps_from_runs,
    trial_from_run,
)
from qatbench.results import RunRecord

METRIC = "latency_p50_ms_b1"


def _run(run_id: str, trial: str, start: int, sweep: str | None = None, **extra: Any) -> dict:
    tags = {"qatbench.trial_id": trial, **({SWEEP_TAG: sweep} if sweep else {})}
    return {
        "run_id": run_id,
        "run_name": trial,
        "start_time": start,
        "tags": tags,
        "metrics": {},
        "params": {},
        "status": "FINISHED",
        "trial": None,
        **extra,
    }


# --- grouping runs into sweeps ---------------------------------------------------------


def test_untagged_runs_start_a_new_sweep_when_a_trial_repeats() -> None:
    runs = [
        _run("r1", "a", 1),
        _run("r2", "b", 2),
        _run("r3", "a", 3),
        _run("r4", "b", 4),
        _run("r5", "a", 5),
    ]
    groups = group_sweeps(list(reversed(runs)))  # any order in, oldest first out
    assert [[r["run_id"] for r in g] for g in groups] == [["r1", "r2"], ["r3", "r4"], ["r5"]]


def test_tagged_runs_group_by_tag_and_keep_a_trials_latest_run() -> None:
    runs = [
        _run("r1", "a", 1, "s1"),
        _run("r2", "b", 2, "s1"),
        _run("r3", "a", 3, "s1"),
        _run("r4", "a", 4, "s2"),
        _run("r5", "c", 5),
    ]
    groups = group_sweeps(runs)
    assert [[r["run_id"] for r in g] for g in groups] == [["r3", "r2"], ["r4"], ["r5"]]
    sweeps = sweeps_from_runs(runs)
    assert [s.id for s in sweeps] == ["s1", "s2", "sweep-3"]
    assert sweeps[0].started == "1970-01-01T00:00:00+00:00"


def test_a_trial_keeps_its_latest_run_that_ended() -> None:
    runs = [
        _run("r1", "a", 1, "s1"),
        _run("r2", "a", 2, "s1", status="RUNNING"),
        _run("r3", "b", 3, "s1", status="RUNNING"),
        _run("r4", "b", 4, "s1", status="FAILED"),
    ]
    assert [r["run_id"] for r in group_sweeps(runs)[0]] == ["r1", "r4"]


def test_the_sweep_tag_is_trackings() -> None:
    from qatbench.tracking import tracker

    assert tracker.SWEEP_TAG == SWEEP_TAG


def test_a_run_without_trial_json_is_rebuilt_from_tags_and_metrics() -> None:
    run = _run("r9", "mlp-ptq-w8a8-torch", 1, metrics={"mse": 0.5})
    run["tags"].update(
        {
            "model": "mlp",
            "method": "ptq",
            "bits": "w8a8",
            "runtime": "torch",
            "qatbench.status": "failed",
            "qatbench.error": "convert: no kernel",
            "env.threads": "1",
            "env.git_dirty": "False",
        }
    )
    trial = trial_from_run(run)
    assert (trial.id, trial.model, trial.status, trial.mlflow_run_id) == (
        "mlp-ptq-w8a8-torch",
        "mlp",
        "failed",
        "r9",
    )
    assert (trial.error.phase, trial.error.reason) == ("convert", "no kernel")
    assert trial.metrics == {"mse": 0.5}
    assert sweeps_from_runs([run])[0].env == {"threads": 1, "git_dirty": False}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mlflow:nightly", (None, "nightly", -1)),
        ("mlflow:nightly@-2", (None, "nightly", -2)),
        ("mlflow:a@b", (None, "a@b", -1)),
        ("nightly@0", (None, "nightly", 0)),
        ("runs/report.json", (Path("runs/report.json"), "", -1)),
    ],
)
def test_sources_parse(text: str, expected: tuple[Any, str, int]) -> None:
    source = parse_source(text)
    assert (source.path, source.experiment, source.index) == expected


def test_an_empty_experiment_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no experiment name"):
        parse_source("mlflow:")


@pytest.mark.parametrize(("text", "value"), [("5%", 0.05), ("0.1", 0.1), (" 0% ", 0.0)])
def test_thresholds_parse(text: str, value: float) -> None:
    assert parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["five", "-5%", "nan", "%"])
def test_bad_thresholds_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--threshold"):
        parse_threshold(text)


# --- history, pure ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def records(real_record: RunRecord, resample) -> list[RunRecord]:
    """Three runs: A, an independent A', then A' 20% slower and 10% less accurate."""
    first = resample(real_record, seed=11)
    second = resample(real_record, seed=12)
    third = resample(second, seed=13, scale=1.2, base=second)
    trial = next(t for t in third.trials if t.ok)
    worse = replace(trial, metrics={**trial.metrics, "accuracy": trial.metrics["accuracy"] * 0.9})
    return [first, second, replace(third, trials=(worse, *third.trials[1:]))]


def _sweeps(records: list[RunRecord]) -> list[Sweep]:
    """The records as sweeps a day apart, each trial with a run id of its own."""
    return [
        Sweep(
            f"s{i}",
            f"2025-12-0{i + 1}T02:00:00+00:00",
            tuple(t.with_run_id(f"run{i}{j}") for j, t in enumerate(r.trials)),
            {},
        )
        for i, r in enumerate(records)
    ]


def test_only_the_regressed_point_is_marked(records: list[RunRecord]) -> None:
    trial = next(t for t in records[0].trials if t.ok).id
    hist = history("nightly", _sweeps(records), METRIC)
    assert [s.trial for s in hist.series] == [trial]  # the failed trial reports nothing
    points = hist.series[0].points
    assert [p.direction for p in points] == [0, 0, 1]
    assert points[0].change is None and points[2].test is not None
    assert points[2].test.significant and points[2].change == pytest.approx(0.2, abs=0.05)


def test_throughput_falls_where_latency_rises(records: list[RunRecord]) -> None:
    hist = history("nightly", _sweeps(records), "throughput_per_s_b4")
    assert [p.direction for p in hist.series[0].points] == [0, 0, -1]


def test_metrics_without_samples_use_the_threshold(records: list[RunRecord]) -> None:
    sweeps = _sweeps(records)
    hist = history("nightly", sweeps, "accuracy")
    assert [p.direction for p in hist.series[0].points] == [0, 0, -1]
    assert all(p.test is None for p in hist.series[0].points)
    relaxed = history("nightly", sweeps, "accuracy", threshold=0.5)
    assert [p.direction for p in relaxed.series[0].points] == [0, 0, 0]


def test_unknown_trial_or_metric_is_a_config_error(records: list[RunRecord]) -> None:
    with pytest.raises(ConfigError, match=r"--trial 'nope'.*trials: mlp-ptq-w8a8-torch"):
        history("nightly", _sweeps(records), METRIC, trial="nope")
    with pytest.raises(ConfigError, match=r"--metric 'latncy'.*metrics: .*latency_p50_ms_b1"):
        history("nightly", _sweeps(records), "latncy")


def test_history_view_geometry(records: list[RunRecord]) -> None:
    hist = history("nightly", _sweeps(records), METRIC)
    view = history_view(hist, {"uri": "http://mlflow:5000", "experiment_id": "7"})
    chart = view["charts"][0]
    assert [m["changed"] for m in chart["marks"]] == [False, False, True]
    assert chart["marks"][2]["tone"] == "bad" and chart["marks"][2]["up"]
    assert chart["marks"][0]["link"].startswith("http://mlflow:5000/#/experiments/7/runs/")
    xs = [m["cx"] for m in chart["marks"]]
    assert xs == sorted(xs) and len(view["changes"]) == 1


# --- a real MLflow store ----------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, records: list[RunRecord]) -> str:
    """The SQLite store with experiments ``nightly`` (tagged sweeps) and ``untagged``."""
    from qatbench.tracking.tracker import Tracker

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    tagged, untagged = Tracker(uri, "nightly"), Tracker(uri, "untagged")
    for i, record in enumerate(records):
        for trial in record.trials:
            tags = {"env.threads": "1"}
            tagged.log_trial(trial, params=trial.params, tags=tags, sweep=f"sweep-{i}")
            untagged.log_trial(trial, params=trial.params)
    return uri


def test_sweeps_load_from_mlflow_with_their_trial_json(store: str, records) -> None:
    uri, experiment_id, sweeps = load_sweeps("nightly", store)
    assert uri == store and experiment_id
    assert [s.id for s in sweeps] == ["sweep-0", "sweep-1", "sweep-2"]
    trial = sweeps[2].trials[0]
    original = next(t for t in records[2].trials if t.id == trial.id)
    assert trial.details["latency_samples"] == original.details["latency_samples"]
    assert trial.mlflow_run_id and trial.metrics[METRIC] == original.metrics[METRIC]
    assert sweeps[0].env == {"threads": 1}
    _, _, untagged = load_sweeps("untagged", store, with_results=False)
    assert len(untagged) == 3 and all(len(s.trials) == 2 for s in untagged)
    assert untagged[0].trials[0].details == {}  # no trial.json fetched


@pytest.fixture
def qatbench(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run the console script's ``main`` in this process (mlflow is imported already):
    returns the exit code, stdout and stderr."""
    from qatbench.cli import main, output

    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setattr(output.out, "width", 160)  # the console may predate COLUMNS

    def invoke(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["qatbench", *map(str, args)])
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capsys.readouterr()
        return int(exited.value.code or 0), captured.out, captured.err

    return invoke


def test_history_cli_renders_the_trend_with_the_change_marked(
    qatbench, store: str, tmp_path: Path, records
) -> None:
    out = tmp_path / "history.html"
    code, stdout, stderr = qatbench(
        "history", "nightly", "--metric", METRIC, "--tracking-uri", store, "-o", out
    )
    assert code == 0, stderr
    trial = next(t for t in records[0].trials if t.ok).id
    assert "3 sweeps, 1 trials, 1 significant changes" in stdout
    assert re.search(rf"sweep-2 .*{trial}", stdout)
    html = out.read_text()
    assert html.count('<g class="pt') == 3 and html.count('<g class="pt changed bad"') == 1
    assert '<polyline class="trend"' in html and "<script>alert" not in html
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", html)


def test_history_cli_for_one_trial_and_the_untagged_experiment(
    qatbench, store: str, tmp_path: Path, records
) -> None:
    trial = next(t for t in records[0].trials if t.ok).id
    out = tmp_path / "accuracy.html"
    code, stdout, stderr = qatbench(
        "history",
        "mlflow:untagged",
        "--metric",
        "accuracy",
        "--trial",
        trial,
        "--threshold",
        "1%",
        "--tracking-uri",
        store,
        "-o",
        out,
    )
    assert code == 0, stderr
    assert "1 significant changes of accuracy" in stdout
    assert out.read_text().count('class="pt changed') == 1


def test_compare_cli_on_mlflow_sweeps(qatbench, store: str) -> None:
    code, _, stderr = qatbench(
        "compare",
        "mlflow:nightly@-2",
        "mlflow:nightly",
        "--gate",
        "latency_p50_ms:+5%",
        "--tracking-uri",
        store,
    )
    assert code == 1, stderr
    assert stderr.count("breach: ") == 2
    code, stdout, stderr = qatbench(
        "compare",
        "mlflow:nightly@0",
        "mlflow:nightly@1",
        "--gate",
        "latency_p50_ms:+5%",
        "--tracking-uri",
        store,
    )
    assert code == 0, stdout + stderr


def test_report_cli_from_an_mlflow_experiment(qatbench, store: str, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    code, _, stderr = qatbench("report", "mlflow:nightly@1", "--tracking-uri", store, "-o", out)
    assert code == 0, stderr
    html = out.read_text()
    assert "mlp-ptq-w8a8-torch" in html and "Latency distributions" in html
    assert "mlflow ui --backend-store-uri sqlite:///" in html


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["history", "nope", "--metric", METRIC], "no experiment named 'nope'"),
        (["history", "nightly", "--metric", "latncy"], "--metric 'latncy'"),
        (["compare", "mlflow:nightly@7", "mlflow:nightly"], "no sweep 7; the experiment has 3"),
    ],
)
def test_cli_errors_on_mlflow_sources_are_one_line(qatbench, store: str, args, fragment) -> None:
    code, stdout, stderr = qatbench(*args, "--tracking-uri", store)
    assert code == 2, stdout + stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert fragment in stderr
