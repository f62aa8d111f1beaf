"""A trial's ONNX graph in MLflow: an ONNX-flavour model with a signature and an input
example, loadable by MLflow's own loaders from the run (a real store, no mocks)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.onnx
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from qatbench.models.linear import build_linear
from qatbench.results import TrialResult
from qatbench.runtimes.onnx_export import export_onnx
from qatbench.tracking.tracker import Tracker

IN, OUT = 64, 32
TRIAL_ID = "linear-fp32-fp32-onnxruntime"  # the logged model's name


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tracker, str, np.ndarray, Path]:
    tmp = tmp_path_factory.mktemp("flavour")
    torch.manual_seed(0)
    model, _ = build_linear(in_features=IN, out_features=OUT)
    onnx_path = export_onnx(model.eval(), (torch.zeros(1, IN),), tmp / "trial" / "model.onnx")
    example = np.random.default_rng(0).standard_normal((1, IN)).astype(np.float32)
    example_path = tmp / "trial" / "input_example.npy"
    np.save(example_path, example)
    result = TrialResult(
        id="linear-fp32-fp32-onnxruntime",
        model="linear",
        method="fp32",
        bits="fp32",
        runtime="onnxruntime",
        status="finished",
        metrics={"size_bytes": float(onnx_path.stat().st_size)},
        artifacts={"onnx": str(onnx_path), "onnx_input_example": str(example_path)},
    )
    tracker = Tracker(None, "flavour", root=tmp)
    run_id = tracker.log_trial(result, params={})
    with torch.inference_mode():
        expected = model(torch.from_numpy(example)).numpy()
    return tracker, run_id, example, expected


def test_onnx_flavour_loads_from_the_run(logged: tuple[Tracker, str, np.ndarray, Path]) -> None:
    tracker, run_id, _, _ = logged
    mlflow.set_tracking_uri(tracker.uri)
    proto = mlflow.onnx.load_model(f"runs:/{run_id}/{TRIAL_ID}")
    assert [i.name for i in proto.graph.input] == ["input"]


def test_pyfunc_predicts_the_input_example(logged: tuple[Tracker, str, np.ndarray, Path]) -> None:
    tracker, run_id, example, expected = logged
    mlflow.set_tracking_uri(tracker.uri)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/{TRIAL_ID}")
    (got,) = pyfunc.predict(example).values()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The saved example is the worker's, and the signature has a dynamic batch dimension.
    np.testing.assert_array_equal(pyfunc.input_example["input"], example)
    (spec,) = pyfunc.metadata.get_input_schema().inputs
    assert spec.shape == (-1, IN) and spec.name == "input"
    (out_spec,) = pyfunc.metadata.get_output_schema().inputs
    assert out_spec.shape == (-1, OUT)
    batch = np.repeat(example, 5, axis=0)
    (many,) = pyfunc.predict(batch).values()
    assert many.shape == (5, OUT)


def test_the_graph_is_stored_once(logged: tuple[Tracker, str, np.ndarray, Path]) -> None:
    tracker, run_id, _, _ = logged
    client = MlflowClient(tracking_uri=tracker.uri)
    assert {a.path for a in client.list_artifacts(run_id)} == {"trial.json"}
    (model,) = client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert model.source_run_id == run_id and model.name == TRIAL_ID
    assert model.tags["qatbench.trial_id"] == TRIAL_ID


def test_a_downloaded_model_onnx_loads_on_its_own(
    logged: tuple[Tracker, str, np.ndarray, Path], tmp_path: Path
) -> None:
    """Done-when: the one file a user downloads from the UI is the whole model."""
    import onnx
    import onnxruntime as ort

    tracker, _, example, expected = logged
    client = MlflowClient(tracking_uri=tracker.uri)
    (model,) = client.search_logged_models(experiment_ids=[tracker.experiment_id])
    folder = Path(model.artifact_location.removeprefix("file://"))
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())
    proto = onnx.load(str(alone / "model.onnx"))  # no <uuid>.data beside it
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(str(alone / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": example})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not [p for p in folder.iterdir() if p.suffix == ".data"]
