"""``qatbench run --resume``: a sweep stopped at any point (Ctrl-C, SIGKILL of the parent)
is completed without measuring a trial twice or logging it to MLflow twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from data.sweep_support import (
    QATBENCH,
    FakeExecutor,
    cli_env,
    qatbench,
    report_trials,
    sqlite_uri,
    sweep_runs,
    wait_for,
    write_experiment,
)
from mlflow import MlflowClient

from qatbench.errors import ConfigError
from qatbench.results import RunRecord
from qatbench.spec.schema import load_experiment
from qatbench.sweep import folders
from qatbench.sweep.runner import resume_experiment, run_experiment

# models x methods x bits on torch: mlp and tiny_transformer, fp32 once, ptq at two widths
MODELS = "[{name: mlp, options: {hidden: [32]}}, tiny_transformer]"
GRID = [
    "mlp-fp32-fp32-torch",
    "mlp-ptq-w8a8-torch",
    "mlp-ptq-w4a8-torch",
    "tiny_transformer-fp32-fp32-torch",
    "tiny_transformer-ptq-w8a8-torch",
    "tiny_transformer-ptq-w4a8-torch",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from qatbench.tracking.store import init_store

    return init_store(sqlite_uri(tmp_path_factory.mktemp("store")))


def test_resume_recovers_each_way_a_sweep_can_stop_and_runs_only_the_rest(
    store: str, tmp_path: Path
) -> None:
    """A complete sweep is cut back to each state a kill can leave, then resumed."""
    exp = write_experiment(tmp_path / "exp.yaml", "stops", store, models=MODELS)
    outcome = run_experiment(exp, output_root=tmp_path / "reports", executor=FakeExecutor())
    assert [t.id for t in outcome.record.trials] == GRID
    run_dir, sweep = outcome.report_json.parent, outcome.record.tracking["sweep"]
    client = MlflowClient(tracking_uri=store)
    run_ids = {t.id: t.mlflow_run_id for t in outcome.record.trials}
    a, b, c, d, e, f = GRID
    # b: killed after its MLflow run was complete, before report.json was rewritten
    # c: killed after result.json, before its MLflow run was created
    client.delete_run(run_ids[c])
    # d: killed while its MLflow run was being logged (RUNNING, no trial.json)
    client.delete_run(run_ids[d])
    partial = client.create_run(
        outcome.record.tracking["experiment_id"],
        run_name=d,
        tags={"qatbench.sweep": sweep, "qatbench.trial_id": d},
    ).info.run_id
    # e: killed while its worker was measuring (nothing but a stray artifact)
    client.delete_run(run_ids[e])
    (run_dir / "trials" / e / "result.json").unlink()
    (run_dir / "trials" / e / "model.onnx").write_text("half")
    # f: killed before it started
    client.delete_run(run_ids[f])
    (run_dir / "trials" / f / "result.json").unlink()
    # a: in report.json; every other trial is cut from it
    record = RunRecord.load(outcome.report_json)
    replace(record, trials=tuple(t for t in record.trials if t.id == a)).save(outcome.report_json)

    executor = FakeExecutor()
    resumed = resume_experiment(outcome.report_json, executor=executor)
    assert executor.ran == [e, f]  # a in the report, b from MLflow, c and d from result.json
    assert resumed.report_json == outcome.report_json
    trials = report_trials(outcome.report_json)
    assert [t["id"] for t in trials] == GRID
    assert outcome.report_json.with_name("report.html").is_file()
    assert not (run_dir / "trials" / e / "model.onnx").exists()  # the stray was cleared

    by_id = {t["id"]: t for t in trials}
    assert by_id[a]["mlflow_run_id"] == run_ids[a]
    assert by_id[b]["mlflow_run_id"] == run_ids[b]  # reused, not logged again
    assert by_id[b]["metrics"] == outcome.record.trials[1].metrics
    runs = sweep_runs(store, "stops", sweep)
    assert sorted(r.info.run_name for r in runs) == sorted(GRID)  # each exactly once
    assert {r.info.run_id for r in runs} == {t["mlflow_run_id"] for t in trials}
    assert client.get_run(partial).info.lifecycle_stage == "deleted"

    again = FakeExecutor()
    resume_experiment(outcome.report_json, executor=again)  # complete: nothing to do
    assert again.ran == []
    assert len(sweep_runs(store, "stops", sweep)) == len(GRID)


def test_resume_by_experiment_file_picks_the_newest_unfinished_sweep(
    store: str, tmp_path: Path
) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", "pick", store)
    reports = tmp_path / "reports"
    spec = load_experiment(exp)
    with pytest.raises(ConfigError, match="no unfinished sweep of 'pick'"):
        folders.find_unfinished(spec, reports, exp)

    def partial(trial: object) -> bool:
        return getattr(trial, "id", "") == "mlp-fp32-fp32-torch"

    older = run_experiment(exp, output_root=reports, executor=FakeExecutor(), select=partial)
    time.sleep(1.1)  # run folders are named by the second
    newer = run_experiment(exp, output_root=reports, executor=FakeExecutor(), select=partial)
    time.sleep(1.1)
    complete = run_experiment(exp, output_root=reports, executor=FakeExecutor())
    assert complete.exit_code == 0
    assert folders.find_unfinished(spec, reports, exp) == newer.report_json
    assert older.report_json != newer.report_json

    # the YAML changed since: refused with what changed, never resumed with other settings
    exp.write_text(exp.read_text().replace("max_time_s: 0.2", "max_time_s: 0.3"))
    with pytest.raises(ConfigError, match=r"ran a different experiment \(changed: measure\)"):
        folders.find_unfinished(load_experiment(exp), reports, exp)


def test_resume_command_line_errors_are_one_line(store: str, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", "cli_errors", store)
    proc = qatbench("run", "--resume", exp, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {exp}: no unfinished sweep of 'cli_errors' under reports/cli_errors; "
        "run without --resume to start one"
    ]
    report = tmp_path / "report.json"
    report.write_text("{}")
    proc = qatbench("run", report, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {report}: a report, not an experiment file;")
    proc = qatbench("run", "--resume", tmp_path / "nope" / "report.json", cwd=tmp_path)
    assert proc.returncode == 2
    assert "nope/report.json: no such report" in proc.stderr
    proc = qatbench("run", "--resume", tmp_path / "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "nope.yaml: no such experiment file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "reports").exists()


# --- the real thing, as a user would meet it --------------------------------------------


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _all_gone(procs: list[psutil.Process]) -> bool:
    return not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_logs_and_reports_every_trial_once(
    tmp_path: Path,
) -> None:
    """Done-when: kill -9 the runner after its 2nd trial, resume, and find every trial
    exactly once in report.json and in MLflow (searched by the sweep tag)."""
    uri = sqlite_uri(tmp_path / "mlruns")
    exp = write_experiment(tmp_path / "exp.yaml", "killed", uri, models=MODELS, bits="[w8a8]")
    grid = [t for t in GRID if "w4a8" not in t]
    proc = subprocess.Popen(
        [str(QATBENCH), "run", str(exp)],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        reports = tmp_path / "reports" / "killed"
        wait_for(
            lambda: any(len(report_trials(p)) >= 2 for p in reports.glob("*/report.json")),
            timeout=150,
            what="two trials in report.json",
        )
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: _all_gone(workers), timeout=15, what="the workers to die with the runner")
    (report,) = reports.glob("*/report.json")
    assert 2 <= len(report_trials(report)) < len(grid)

    resumed = qatbench("run", "--resume", exp, cwd=tmp_path, timeout=150)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "killed: 4 finished, 0 failed" in resumed.stdout
    assert f"report.json: {report.relative_to(tmp_path)}" in resumed.stdout

    trials = report_trials(report)
    assert sorted(t["id"] for t in trials) == sorted(grid)  # each exactly once
    assert all(t["status"] == "finished" and t["mlflow_run_id"] for t in trials)
    sweep = json.loads(report.read_text())["tracking"]["sweep"]
    runs = sweep_runs(uri, "killed", sweep)
    assert sorted(r.info.run_name for r in runs) == sorted(grid)
    assert {r.info.run_id for r in runs} == {t["mlflow_run_id"] for t in trials}
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert report.with_name("report.html").is_file()


@pytest.mark.slow
def test_ctrl_c_kills_the_worker_writes_a_partial_report_and_exits_130(tmp_path: Path) -> None:
    """Ctrl-C at the terminal (SIGINT to the foreground process group) mid-sweep."""
    uri = sqlite_uri(tmp_path / "mlruns")
    exp = write_experiment(tmp_path / "exp.yaml", "ctrl_c", uri)
    # Trials of seconds, so the Ctrl-C lands mid-sweep and not after the last trial (when
    # the finished sweep writes its report with signals shielded).
    exp.write_text(exp.read_text().replace("max_time_s: 0.2", "max_time_s: 3.0"))
    proc = subprocess.Popen(
        [str(QATBENCH), "run", str(exp)],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
        # A foreground job's Ctrl-C is not ignored, whatever this test process inherited
        # (an ignored SIGINT stays ignored across exec, and Python then keeps it so).
        preexec_fn=_default_sigint,
    )
    try:
        reports = tmp_path / "reports" / "ctrl_c"
        wait_for(
            lambda: any(len(report_trials(p)) >= 1 for p in reports.glob("*/report.json")),
            timeout=150,
            what="a trial in report.json",
        )
        wait_for(lambda: len(_children(proc.pid)) >= 2, timeout=30, what="the next worker")
        workers = _children(proc.pid)  # the forkserver and the worker of the 2nd trial
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    (report,) = reports.glob("*/report.json")
    saved = report_trials(report)
    assert 1 <= len(saved) < 3
    last = stderr.strip().splitlines()[-1]
    rel = report.relative_to(tmp_path)
    assert last == (
        f"interrupted: {len(saved)} of 3 trials saved in {rel}; "
        f"resume with: qatbench run --resume {rel}"
    )
    assert stdout == ""
    assert report.with_name("report.html").is_file()
    assert not list(report.parent.glob(".*.tmp"))
    wait_for(lambda: _all_gone(workers), timeout=15, what="the workers to be killed")
