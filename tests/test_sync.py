"""Tracking outages: an unreachable store is refused before the first trial; a store that
fails mid-sweep leaves results in report.json only, and ``qatbench sync`` pushes them
later, exactly once, however often it runs.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from data.sweep_support import (
    FakeExecutor,
    all_runs,
    qatbench,
    report_trials,
    sqlite_uri,
    sweep_runs,
    write_experiment,
)
from mlflow import MlflowClient

from qatbench.results import RunRecord
from qatbench.sweep.runner import run_experiment

GRID = ["mlp-fp32-fp32-torch", "mlp-ptq-w8a8-torch", "mlp-ptq-w4a8-torch"]


def closed_port_uri() -> str:
    """An http URI on which nothing listens (a port the OS just gave up)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_one_error_line(proc: object, *fragments: str) -> None:
    stderr = getattr(proc, "stderr", "")
    assert getattr(proc, "returncode", None) == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_an_unreachable_store_is_reported_before_the_first_trial(tmp_path: Path) -> None:
    uri = closed_port_uri()
    exp = write_experiment(tmp_path / "exp.yaml", "outage", sqlite_uri(tmp_path / "mlruns"))
    proc = qatbench("run", exp, "--tracking-uri", uri, cwd=tmp_path, timeout=60)
    assert_one_error_line(proc, f"tracking uri {uri} is not reachable")
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]  # nothing written


@pytest.fixture
def broken_mid_sweep(tmp_path: Path) -> tuple[Path, str]:
    """A sweep whose artifact store fails from its 2nd trial on (as an unmounted share
    would), then comes back: (report.json, tracking uri)."""
    store = tmp_path / "mlruns"
    uri = sqlite_uri(store)
    artifacts, away = store / "artifacts", store / "artifacts.away"
    exp = write_experiment(tmp_path / "exp.yaml", "flaky", uri)

    def break_store(trial_id: str) -> None:
        if trial_id == GRID[1]:
            artifacts.rename(away)
            artifacts.write_text("not a folder")

    with pytest.warns(
        UserWarning,
        match=r"2 trial\(s\) are in .* but not in MLflow; push them "
        r"with: qatbench sync",
    ):
        outcome = run_experiment(
            exp, output_root=tmp_path / "reports", executor=FakeExecutor(before=break_store)
        )
    assert outcome.exit_code == 0  # the results are good; only their logging failed
    assert outcome.unlogged == GRID[1:]
    artifacts.unlink()
    away.rename(artifacts)
    return outcome.report_json, uri


def test_results_survive_a_store_failing_mid_sweep(broken_mid_sweep: tuple[Path, str]) -> None:
    report, _ = broken_mid_sweep
    trials = report_trials(report)
    assert [t["id"] for t in trials] == GRID
    assert all(t["status"] == "finished" for t in trials)
    assert trials[0]["mlflow_run_id"]
    assert [t["mlflow_run_id"] for t in trials[1:]] == [None, None]
    assert report.with_name("report.html").is_file()


def test_sync_pushes_what_is_missing_once_and_is_idempotent(
    broken_mid_sweep: tuple[Path, str],
) -> None:
    report, uri = broken_mid_sweep
    sweep = json.loads(report.read_text())["tracking"]["sweep"]
    first_id = report_trials(report)[0]["mlflow_run_id"]
    cwd = report.parents[3]

    proc = qatbench("sync", report, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{report}: 2 trials pushed, 1 already in MLflow" in proc.stdout
    trials = report_trials(report)
    assert trials[0]["mlflow_run_id"] == first_id
    assert all(t["mlflow_run_id"] for t in trials)
    runs = sweep_runs(uri, "flaky", sweep)
    assert sorted(r.info.run_name for r in runs) == sorted(GRID)  # the broken runs are gone
    assert {r.info.run_id for r in runs} == {t["mlflow_run_id"] for t in trials}
    client = MlflowClient(tracking_uri=uri)
    for trial in trials:
        logged = client.download_artifacts(trial["mlflow_run_id"], "trial.json", str(cwd))
        assert json.loads(Path(logged).read_text())["id"] == trial["id"]

    again = qatbench("sync", report.parent, cwd=cwd, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "0 trials pushed, 3 already in MLflow" in again.stdout
    assert report_trials(report) == trials
    assert len(all_runs(uri, "flaky")) == len(GRID)


def test_sync_replaces_run_ids_the_store_does_not_have(
    tmp_path: Path, sample_record: RunRecord
) -> None:
    """A report from elsewhere (its run ids unknown here) is pushed to a store, once."""
    report = tmp_path / "run" / "report.json"
    sample_record.save(report)
    uri = sqlite_uri(tmp_path / "mlruns")
    n = len(sample_record.trials)

    proc = qatbench("sync", report, "--tracking-uri", uri, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{n} trials pushed, 0 already in MLflow" in proc.stdout
    saved = json.loads(report.read_text())
    assert saved["tracking"]["uri"] == uri
    sweep = saved["tracking"]["sweep"]
    runs = sweep_runs(uri, "quickstart", sweep)
    assert {r.info.run_id for r in runs} == {t["mlflow_run_id"] for t in saved["trials"]}
    assert len(runs) == n
    assert {t["mlflow_run_id"] for t in saved["trials"]}.isdisjoint(
        t.mlflow_run_id for t in sample_record.trials
    )
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and "no int4 MatMulInteger" in failed[0].data.tags["qatbench.error"]

    again = qatbench("sync", report, "--tracking-uri", uri, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"0 trials pushed, {n} already in MLflow" in again.stdout
    assert len(all_runs(uri, "quickstart")) == n


def test_sync_to_an_unreachable_store_changes_nothing(
    tmp_path: Path, sample_record: RunRecord
) -> None:
    report = tmp_path / "report.json"
    sample_record.save(report)
    before = report.read_text()
    uri = closed_port_uri()
    proc = qatbench("sync", report, "--tracking-uri", uri, cwd=tmp_path, timeout=60)
    assert_one_error_line(proc, f"tracking uri {uri} is not reachable")
    assert report.read_text() == before
    assert_one_error_line(qatbench("sync", tmp_path / "nope.json", cwd=tmp_path), "no such report")
