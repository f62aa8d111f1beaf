"""The sweep runner: run folders, the sweep tag on every MLflow run, interruptions, and a
real sweep in which one method aborts its worker process.

Most tests drive :func:`run_experiment` in-process with a FakeExecutor (no worker: the
runner's bookkeeping is what they check) against a real SQLite MLflow store.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
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

from qatbench.errors import ConfigError
from qatbench.sweep import folders
from qatbench.sweep.outcome import RunOutcome
from qatbench.sweep.runner import new_sweep_id, run_experiment

GRID = ["mlp-fp32-fp32-torch", "mlp-ptq-w8a8-torch", "mlp-ptq-w4a8-torch"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating one takes seconds); experiments differ."""
    from qatbench.tracking.store import init_store

    return init_store(sqlite_uri(tmp_path_factory.mktemp("store")))


def test_every_run_of_a_sweep_carries_its_id_and_failed_runs_end_failed(
    store: str, tmp_path: Path
) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", "tagged", store)
    executor = FakeExecutor(fail=frozenset({"mlp-ptq-w4a8-torch"}))
    outcome = run_experiment(exp, output_root=tmp_path / "reports", executor=executor)

    sweep = outcome.record.tracking["sweep"]
    assert outcome.report_json.parent.parent == tmp_path / "reports" / "tagged"
    saved = json.loads(outcome.report_json.read_text())
    assert saved["tracking"]["sweep"] == sweep
    assert [t["id"] for t in saved["trials"]] == GRID
    assert outcome.report_html.is_file()
    assert outcome.exit_code == 1
    assert executor.stopped >= 1

    runs = {r.info.run_name: r for r in sweep_runs(store, "tagged", sweep)}
    assert sorted(runs) == sorted(GRID)
    for trial in saved["trials"]:
        assert runs[trial["id"]].info.run_id == trial["mlflow_run_id"]
    failed = runs["mlp-ptq-w4a8-torch"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["qatbench.error"] == "convert: worker process killed by SIGABRT"
    assert runs["mlp-fp32-fp32-torch"].info.status == "FINISHED"
    # each trial's result was kept beside its artifacts before it was logged
    for trial_id in GRID:
        kept = json.loads(
            (outcome.report_json.parent / "trials" / trial_id / "result.json").read_text()
        )
        assert kept["id"] == trial_id


def test_two_sweeps_of_one_experiment_get_their_own_folders_and_ids(
    store: str, tmp_path: Path
) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", "twice", store, methods="[fp32]")
    first = run_experiment(exp, output_root=tmp_path / "reports", executor=FakeExecutor())
    second = run_experiment(exp, output_root=tmp_path / "reports", executor=FakeExecutor())
    assert first.report_json != second.report_json
    assert first.record.tracking["sweep"] != second.record.tracking["sweep"]
    assert len(all_runs(store, "twice")) == 2
    for outcome in (first, second):
        sweep = outcome.record.tracking["sweep"]
        assert [r.info.run_id for r in sweep_runs(store, "twice", sweep)] == [
            outcome.record.trials[0].mlflow_run_id
        ]


def test_sweep_ids_sort_by_time_and_are_unique() -> None:
    t = dt.datetime(2026, 11, 29, 2, 27, 44, tzinfo=dt.UTC)
    ids = {new_sweep_id(t) for _ in range(50)}
    assert len(ids) == 50
    assert all(i.startswith("20261129T022744Z-") for i in ids)
    assert new_sweep_id(t) < new_sweep_id(t + dt.timedelta(seconds=1))


def test_ctrl_c_mid_sweep_keeps_a_partial_report_and_stops_the_worker(
    store: str, tmp_path: Path
) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", "interrupted", store)

    def ctrl_c_on_third(trial_id: str) -> None:
        if trial_id == GRID[2]:
            raise KeyboardInterrupt

    executor = FakeExecutor(before=ctrl_c_on_third)
    outcome = run_experiment(exp, output_root=tmp_path / "reports", executor=executor)
    assert isinstance(outcome, RunOutcome)
    assert outcome.interrupted == "SIGINT"
    assert outcome.exit_code == 130
    assert outcome.missing == [GRID[2]]
    assert [t["id"] for t in report_trials(outcome.report_json)] == GRID[:2]
    assert outcome.report_html.is_file()
    assert executor.stopped >= 1
    assert not list(outcome.report_json.parent.glob(".*.tmp"))  # no half-written file


def test_sigterm_mid_sweep_is_an_interruption_too(store: str, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", "terminated", store)

    def terminate_on_second(trial_id: str) -> None:
        if trial_id == GRID[1]:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    executor = FakeExecutor(before=terminate_on_second)
    outcome = run_experiment(exp, output_root=tmp_path / "reports", executor=executor)
    assert outcome.interrupted == "SIGTERM"
    assert outcome.exit_code == 143
    assert [t["id"] for t in report_trials(outcome.report_json)] == GRID[:1]
    assert signal.getsignal(signal.SIGTERM) == handler  # restored after the sweep


# --- paths -----------------------------------------------------------------------------------


def test_trial_folders_stay_inside_the_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "reports" / "x" / "20261129T022744Z"
    for trial_id in [*GRID, "m.v2-ptq-w4a8-onnxruntime", "a..b-fp32-fp32-torch"]:
        path = folders.trial_dir(run_dir, trial_id)
        assert path.resolve().is_relative_to(run_dir.resolve())
        assert path.parent == run_dir / "trials"
    for hostile in ["../x", "..", ".", "a/../../b", "/etc/passwd", "x\\..\\y", "", "-rf", "a\x00"]:
        with pytest.raises(ConfigError, match="cannot be a folder name"):
            folders.trial_dir(run_dir, hostile)


def test_a_trial_id_built_from_unchecked_names_cannot_escape(store: str, tmp_path: Path) -> None:
    """Even a TrialSpec built around validation (model_construct) cannot write outside."""
    from qatbench.spec.schema import ModelEntry

    entry = ModelEntry.model_construct(name="../../escape", factory=None, options={}, expect=[])
    trial_id = f"{entry.name}-fp32-fp32-torch"
    with pytest.raises(ConfigError):
        folders.trial_dir(tmp_path / "run", trial_id)
    with pytest.raises(ConfigError):
        folders.new_run_dir(tmp_path / "reports", "../escape", dt.datetime.now(dt.UTC))
    assert not (tmp_path / "escape").exists()


def test_a_sweep_folder_is_written_by_one_process_at_a_time(tmp_path: Path) -> None:
    busy = pytest.raises(ConfigError, match="another qatbench process")
    with folders.locked(tmp_path), busy, folders.locked(tmp_path):
        pass
    with folders.locked(tmp_path):  # released when the holder is done
        pass


# --- a real sweep --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_method_that_aborts_fails_its_trial_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """Done-when: 6 trials, one aborts its worker (SIGABRT): 5 finished, 1 failed with its
    reason, exit 1, a complete report. The aborting method is a third-party plugin,
    installed as an entry point (a dist-info folder on PYTHONPATH)."""
    site = tmp_path / "site"
    info = site / "qatbench_crashy-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qatbench-crashy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[qatbench.methods]\nabort_in_convert = crashy_methods:AbortInConvert\n"
    )
    uri = sqlite_uri(tmp_path / "mlruns")
    exp = write_experiment(
        tmp_path / "exp.yaml",
        "aborting",
        uri,
        methods="[fp32, ptq, abort_in_convert]",
        bits="[w8a8, w4a8]",
        runtimes="[torch, onnxruntime]",
        extra="exclude: [{method: ptq, bits: w4a8, runtime: onnxruntime},\n"
        "          {method: abort_in_convert, runtime: onnxruntime}]\n",
    )
    # fp32 on 2 runtimes, ptq w8a8 on 2 and w4a8 on torch, abort_in_convert (w8a8 only) on torch
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parent / "data")])}
    proc = qatbench("run", exp, cwd=tmp_path, env=env, timeout=240)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "aborting: 5 finished, 1 failed" in proc.stdout

    (report,) = (tmp_path / "reports" / "aborting").glob("*/report.json")
    trials = {t["id"]: t for t in report_trials(report)}
    assert len(trials) == 6
    failed = [t for t in trials.values() if t["status"] == "failed"]
    assert [t["id"] for t in failed] == ["mlp-abort_in_convert-w8a8-torch"]
    assert failed[0]["error"]["phase"] == "convert"
    assert "SIGABRT" in failed[0]["error"]["reason"]
    assert "mlp-abort_in_convert-w8a8-torch: convert: worker process killed by SIGABRT" in (
        proc.stderr
    )
    assert report.with_name("report.html").is_file()
    # fp32's reference outputs computed by the first trial, its graph's bytes by fp32's
    # onnxruntime trial, ptq w8a8's converted model by its torch trial; read by the others,
    # and the shared folder gone with the sweep
    read = {i: t["details"].get("read_from_sweep", []) for i, t in trials.items()}
    assert read["mlp-fp32-fp32-torch"] == []
    assert read["mlp-fp32-fp32-onnxruntime"] == ["fp32_model", "reference_outputs"]
    w8a8_ort = "mlp-ptq-w8a8-onnxruntime"
    assert read[w8a8_ort] == ["fp32_model", "reference_outputs", "graph_bytes", "converted_model"]
    assert trials[w8a8_ort]["details"]["converted_by"] == "mlp-ptq-w8a8-torch"
    assert "calibrate_s" in trials["mlp-ptq-w8a8-torch"]["phases"]
    assert "calibrate_s" not in trials[w8a8_ort]["phases"]
    assert read["mlp-ptq-w4a8-torch"] == ["fp32_model", "reference_outputs"]
    # the loaded build is the built one: same weights, same outputs, same sizes
    built, loaded = trials["mlp-fp32-fp32-torch"], trials["mlp-ptq-w4a8-torch"]
    assert built["metrics"]["fp32_weight_bytes"] == loaded["metrics"]["fp32_weight_bytes"]
    assert "converted_by" not in trials["mlp-ptq-w4a8-torch"]["details"]
    assert not report.with_name("shared").exists()
    sweep = json.loads(report.read_text())["tracking"]["sweep"]
    runs = {r.info.run_name: r for r in sweep_runs(uri, "aborting", sweep)}
    assert sorted(runs) == sorted(trials)
    assert runs["mlp-abort_in_convert-w8a8-torch"].info.status == "FAILED"
    assert "SIGABRT" in runs["mlp-abort_in_convert-w8a8-torch"].data.tags["qatbench.error"]
    assert {r.info.status for n, r in runs.items() if "abort" not in n} == {"FINISHED"}


def test_a_graph_kept_by_torch_trials_is_exported_once_for_both_runtimes(
    tmp_path: Path,
) -> None:
    """With ``artifacts: [onnx]`` the torch trials export too: each model's graph is
    exported by its first trial and linked by the onnxruntime trial, whose folder then
    holds the same file (one inode), and rtn's conversion is made once."""
    uri = sqlite_uri(tmp_path / "mlruns")
    exp = write_experiment(
        tmp_path / "exp.yaml",
        "linked",
        uri,
        methods="[fp32, {name: rtn, bits: [w8]}]",
        bits="[w8]",
        runtimes="[torch, onnxruntime]",
        extra="artifacts: [onnx]\n",
    )
    proc = qatbench("run", exp, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (report,) = (tmp_path / "reports" / "linked").glob("*/report.json")
    trials = {t["id"]: t for t in report_trials(report)}
    for method in ("fp32-fp32", "rtn-w8"):
        torch_trial, ort_trial = trials[f"mlp-{method}-torch"], trials[f"mlp-{method}-onnxruntime"]
        assert "exported_by" not in torch_trial["details"]
        assert ort_trial["details"]["exported_by"] == torch_trial["id"]
        assert "exported_graph" in ort_trial["details"]["read_from_sweep"]
        graphs = [Path(t["artifacts"]["onnx"]) for t in (torch_trial, ort_trial)]
        assert graphs[0] != graphs[1] and graphs[0].stat().st_ino == graphs[1].stat().st_ino
        assert ort_trial["metrics"]["onnx_size_bytes"] == torch_trial["metrics"]["onnx_size_bytes"]
    assert trials["mlp-rtn-w8-onnxruntime"]["details"]["converted_by"] == "mlp-rtn-w8-torch"
    assert not report.with_name("shared").exists()
