"""Tracking against a real MLflow SQLite store in a temporary folder (never a mock).

Creating a store takes seconds, so one store and one pair of logged trials serve the module.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import onnx
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper

import qatbench
from qatbench.errors import TrackingError
from qatbench.results import TrialFailure, TrialResult
from qatbench.tracking.onnx_model import share_storage
from qatbench.tracking.queries import search_trials
from qatbench.tracking.run_data import flatten
from qatbench.tracking.store import artifact_root_for, default_uri, init_store
from qatbench.tracking.tracker import Tracker

EXPERIMENT = "tracking-test"
METRICS = {
    "size_bytes": 1234.0,
    "compression_ratio": 3.9,
    "latency_p50_ms_b1": 0.25,
    "throughput_per_s_b1": 4000.0,
    "peak_rss_bytes": 2.5e8,
    "mse": 1e-4,
    "accuracy": 0.97,
}
PARAMS = {
    "method": {"name": "ptq", "config": {"per_channel": True, "observer": "minmax"}},
    "threads": 1,
    "batch_sizes": [1, 8],
    "note": "x" * 7000,
}
TAGS = {"git.commit": "abc123", "env.cpu.model": "Test CPU"}


def write_identity_onnx(path: Path) -> Path:
    """A tiny valid ONNX model: y = Identity(x)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def tracker(root: Path) -> Tracker:
    return Tracker(None, EXPERIMENT, root=root)


@pytest.fixture(scope="module")
def client(tracker: Tracker) -> MlflowClient:
    return MlflowClient(tracking_uri=tracker.uri)


@pytest.fixture(scope="module")
def logged(tracker: Tracker, root: Path) -> dict[str, tuple[TrialResult, str]]:
    """A finished trial with an ONNX file and a failed one, logged: trial id -> (result, run id)."""
    onnx_path = write_identity_onnx(root / "quantized.onnx")
    finished = TrialResult(
        id="mlp-ptq-w8a8-onnxruntime",
        model="mlp",
        method="ptq",
        bits="w8a8",
        runtime="onnxruntime",
        status="finished",
        metrics=METRICS,
        phases={"prepare": 0.1, "convert": 0.2},
        artifacts={"onnx": str(onnx_path)},
        params={"threads": 1},
    )
    failed = TrialResult(
        id="mlp-ptq-w4a4-onnxruntime",
        model="mlp",
        method="ptq",
        bits="w4a4",
        runtime="onnxruntime",
        status="failed",
        metrics={**METRICS, "sqnr_db": math.nan},
        error=TrialFailure(phase="export", reason="unsupported op Foo"),
    )
    return {r.id: (r, tracker.log_trial(r, params=PARAMS, tags=TAGS)) for r in (finished, failed)}


def runs_by_name(client: MlflowClient, tracker: Tracker) -> dict[str, Any]:
    runs = client.search_runs([tracker.experiment_id])
    return {run.info.run_name: run for run in runs}


def test_default_uri_and_artifact_root(tmp_path: Path) -> None:
    uri = default_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve().as_posix()}/mlruns/mlflow.db"
    assert artifact_root_for(uri) == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()
    assert artifact_root_for("http://127.0.0.1:5000") is None
    assert artifact_root_for("sqlite://") is None


def test_flatten_uses_dotted_keys_and_keeps_lists_as_text() -> None:
    nested = {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2], "f": {}}
    assert flatten(nested) == {"a.b.c": 1, "a.d": "x", "e": "[1, 2]", "f": {}}
    assert flatten({"k": 1}, prefix="p") == {"p.k": 1}


def test_one_run_per_trial_named_by_trial_id_with_status(
    logged: dict[str, tuple[TrialResult, str]], tracker: Tracker, client: MlflowClient
) -> None:
    runs = runs_by_name(client, tracker)
    assert len(client.search_runs([tracker.experiment_id])) == len(logged) == len(runs)
    for trial_id, (result, run_id) in logged.items():
        assert runs[trial_id].info.run_id == run_id
        assert runs[trial_id].info.status == ("FINISHED" if result.ok else "FAILED")


def test_metrics_are_logged_and_non_finite_ones_named(
    logged: dict[str, tuple[TrialResult, str]], client: MlflowClient
) -> None:
    for _, run_id in logged.values():
        assert client.get_run(run_id).data.metrics == pytest.approx(METRICS)
    _, failed_id = logged["mlp-ptq-w4a4-onnxruntime"]
    assert client.get_run(failed_id).data.tags["qatbench.nonfinite_metrics"] == "sqnr_db"


def test_params_are_flattened_with_dotted_keys_and_truncated(
    logged: dict[str, tuple[TrialResult, str]], client: MlflowClient
) -> None:
    _, run_id = logged["mlp-ptq-w8a8-onnxruntime"]
    params = client.get_run(run_id).data.params
    assert params["method.name"] == "ptq"
    assert params["method.config.per_channel"] == "True"
    assert params["method.config.observer"] == "minmax"
    assert params["threads"] == "1"
    assert params["batch_sizes"] == "[1, 8]"
    assert params["note"] == "x" * 6000


def test_tags_identify_the_trial(
    logged: dict[str, tuple[TrialResult, str]], client: MlflowClient
) -> None:
    version = getattr(qatbench, "__version__", None) or importlib.metadata.version("qatbench")
    for result, run_id in logged.values():
        tags = client.get_run(run_id).data.tags
        assert tags["qatbench.version"] == version
        assert tags["qatbench.status"] == result.status
        assert tags["qatbench.trial_id"] == result.id
        assert (tags["model"], tags["method"], tags["bits"], tags["runtime"]) == (
            result.model,
            result.method,
            result.bits,
            result.runtime,
        )
        assert tags["git.commit"] == "abc123"
        assert tags["env.cpu.model"] == "Test CPU"
    finished_tags = client.get_run(logged["mlp-ptq-w8a8-onnxruntime"][1]).data.tags
    failed_tags = client.get_run(logged["mlp-ptq-w4a4-onnxruntime"][1]).data.tags
    assert "qatbench.error" not in finished_tags
    assert failed_tags["qatbench.error"] == "export: unsupported op Foo"


def test_artifacts_hold_the_onnx_model_and_trial_json(
    logged: dict[str, tuple[TrialResult, str]],
    client: MlflowClient,
    root: Path,
    tmp_path: Path,
) -> None:
    for result, run_id in logged.values():
        assert {a.path for a in client.list_artifacts(run_id)} == {"trial.json"}
        trial_json = client.download_artifacts(run_id, "trial.json", str(tmp_path))
        logged_trial = json.loads(Path(trial_json).read_text())
        expected = result.with_run_id(run_id).to_dict()
        # Compared as canonical text: the failed trial's NaN metric is not equal to itself.
        assert json.dumps(logged_trial, sort_keys=True) == json.dumps(expected, sort_keys=True)
    # The ONNX graph is the run's logged ONNX-flavour model (see test_onnx_flavour.py).
    _, run_id = logged["mlp-ptq-w8a8-onnxruntime"]
    (model,) = client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    assert model.name == "mlp-ptq-w8a8-onnxruntime"  # the trial id
    assert model.artifact_location.startswith((root / "mlruns" / "artifacts").as_uri())
    folder = Path(model.artifact_location.removeprefix("file://"))
    onnx.checker.check_model(onnx.load(str(folder / "model.onnx")))


def test_experiment_is_created_once(root: Path, tracker: Tracker, client: MlflowClient) -> None:
    again = Tracker(None, EXPERIMENT, root=root)
    assert again.experiment_id == tracker.experiment_id
    assert again.uri == tracker.uri == init_store(root=root)
    matching = client.search_experiments(filter_string=f"name = '{EXPERIMENT}'")
    assert [e.experiment_id for e in matching] == [tracker.experiment_id]
    assert matching[0].artifact_location == artifact_root_for(tracker.uri)


def test_find_run(logged: dict[str, tuple[TrialResult, str]], tracker: Tracker) -> None:
    for trial_id, (_, run_id) in logged.items():
        assert tracker.find_run(trial_id) == run_id
    assert tracker.find_run("mlp-ptq-w2a2-onnxruntime") is None


def test_search_trials_returns_plain_run_data(
    logged: dict[str, tuple[TrialResult, str]], tracker: Tracker
) -> None:
    trials = {t["run_name"]: t for t in search_trials(tracker.uri, EXPERIMENT)}
    assert set(trials) == set(logged)
    finished = trials["mlp-ptq-w8a8-onnxruntime"]
    assert finished["run_id"] == logged["mlp-ptq-w8a8-onnxruntime"][1]
    assert finished["status"] == "FINISHED"
    assert finished["metrics"]["accuracy"] == pytest.approx(0.97)
    assert finished["params"]["method.name"] == "ptq"
    assert finished["tags"]["model"] == "mlp"
    with pytest.raises(TrackingError, match="no experiment named 'missing'"):
        search_trials(tracker.uri, "missing")


def test_a_logging_failure_leaves_a_failed_run_and_one_line_error(
    root: Path, client: MlflowClient, tmp_path: Path
) -> None:
    tracker = Tracker(None, "tracking-test-broken", root=root)  # keeps the shared one clean
    broken = TrialResult(
        id="mlp-fp32-fp32-torch",
        model="mlp",
        method="fp32",
        bits="fp32",
        runtime="torch",
        status="finished",
        artifacts={"onnx": str(tmp_path / "missing.onnx")},
    )
    with pytest.raises(TrackingError, match="logging trial mlp-fp32-fp32-torch failed") as info:
        tracker.log_trial(broken, params={})
    assert "\n" not in str(info.value)
    run_id = tracker.find_run(broken.id)
    assert run_id is not None
    assert client.get_run(run_id).info.status == "FAILED"


def test_unreachable_server_fails_fast_with_one_line() -> None:
    start = time.monotonic()
    with pytest.raises(TrackingError) as info:
        Tracker("http://127.0.0.1:9", EXPERIMENT)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert message.startswith("tracking uri http://127.0.0.1:9 is not reachable: ")
    assert "\n" not in message


def test_the_logged_graph_is_the_sweep_folders_file_stored_once(
    logged: dict[str, tuple[TrialResult, str]], client: MlflowClient
) -> None:
    result, run_id = logged["mlp-ptq-w8a8-onnxruntime"]
    (model,) = client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    copy = Path(model.artifact_location.removeprefix("file://")) / "model.onnx"
    graph = Path(result.artifacts["onnx"])
    assert os.path.samefile(copy, graph)  # one inode, two names
    assert graph.stat().st_nlink == 2


def test_a_different_logged_file_keeps_its_copy(tmp_path: Path) -> None:
    graph = write_identity_onnx(tmp_path / "model.onnx")
    logged = tmp_path / "logged"
    logged.mkdir()
    (logged / "model.onnx").write_bytes(b"x" * graph.stat().st_size)
    assert not share_storage(graph, logged)
    assert not share_storage(graph, None)
    assert graph.stat().st_nlink == 1
