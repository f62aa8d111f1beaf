"""A large graph is saved as one file and one external-data file, whatever the exporter
wrote, and stays loadable through metadata rewrites and by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qatbench.runtimes import onnx_export
from qatbench.runtimes import onnxruntime as ortrt


def test_weights_past_the_threshold_go_to_one_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as a > 1 GiB model would
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    x = torch.randn(3, 64)
    path = onnx_export.export_onnx(model, (x[:1],), tmp_path / "graph" / "model.onnx")
    onnx_export.write_metadata(path, {"qatbench.method": "fp32"})
    onnx_export.check_onnx(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    data = path.with_name("model.onnx.data").stat().st_size
    assert data >= (64 * 128 + 128 * 8) * 4  # every weight lives in the data file
    assert onnx_export.graph_bytes(path) == path.stat().st_size + data
    with torch.inference_mode():
        want = model(x)
    got = ortrt.as_callable(ortrt.make_session(path, 1))(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_small_graphs_stay_one_file(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    path = onnx_export.export_onnx(model, (torch.zeros(1, 4),), tmp_path / "model.onnx")
    onnx_export.write_metadata(path, {"qatbench.method": "fp32"})
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert onnx_export.graph_bytes(path) == path.stat().st_size


def test_the_exporter_never_holds_the_weights_in_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph is encoded without initializers; each weight reaches the data file once,
    byte for byte the tensor it came from (constant folding's transposes included)."""
    encoded: list[int] = []
    original = torch._C.Graph._export_onnx

    def spy(graph: torch._C.Graph, params: dict, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        encoded.append(len(params))
        return original(graph, params, *args, **kwargs)

    monkeypatch.setattr(torch._C.Graph, "_export_onnx", spy)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False), torch.nn.Linear(128, 8))
    x = torch.randn(2, 5, 64)  # 3-D: the exporter folds each weight's transpose for MatMul
    path = onnx_export.export_onnx(model, (x[:1],), tmp_path / "model.onnx")
    assert encoded == [0]  # the message the exporter built held no weight
    proto = onnx.load(str(path), load_external_data=False)
    external = {
        t.name: {e.key: e.value for e in t.external_data}
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert len(external) == 2  # the two matrices; the bias (32 bytes) stays in the message
    data = path.with_name("model.onnx.data").read_bytes()
    matrices = sorted(
        np.frombuffer(data[int(e["offset"]) : int(e["offset"]) + int(e["length"])], np.float32)
        .reshape(-1)
        .tolist()
        for e in external.values()
    )
    want = sorted(m.weight.detach().t().reshape(-1).tolist() for m in model)
    assert matrices == want
    assert not {i.name for i in proto.graph.input} & set(external)  # not graph inputs
    with torch.inference_mode():
        expected = model(x)
    got = ortrt.as_callable(ortrt.make_session(path, 1))(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_graph_passes_leave_no_stale_bytes_in_the_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weight-only lowering replaces the exported integer weights by packed ones: the data
    file keeps only what the graph points to."""
    from qatbench.methods.rtn import RtnMethod
    from qatbench.quant.bitwidth import BitWidth

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64)]
    model = torch.nn.Sequential(*layers)
    method = RtnMethod(RtnMethod.Config.model_validate({"group_size": 32}), BitWidth.parse("w4"))
    candidate = method.convert(method.prepare(model)).eval()
    x = torch.randn(3, 256)
    path = onnx_export.export_onnx(candidate, (x[:1],), tmp_path / "model.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    lengths = [
        int({e.key: e.value for e in t.external_data}["length"])
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    size = path.with_name("model.onnx.data").stat().st_size
    assert sum(lengths) <= size <= sum(lengths) + 64 * len(lengths)  # alignment only
    assert sum(lengths) < 4 * (256 * 512 + 512 * 64) * 0.2  # int4 and scales, not int8 or fp32
    with torch.inference_mode():
        expected = candidate(x)
    got = ortrt.as_callable(ortrt.make_session(path, 1))(x)
    assert torch.allclose(got, expected, atol=0.05 * expected.abs().max().item())


def test_a_large_graph_is_logged_to_mlflow_with_its_data_linked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's process logs a large graph without loading its weights: the logged
    model's ``model.onnx`` is the sweep folder's file (a hard link), its external data a
    copy (onnx's loader refuses a data file with two links), and MLflow's loader runs it."""
    import mlflow.onnx
    from mlflow import MlflowClient

    from qatbench.results import TrialResult
    from qatbench.tracking import onnx_model
    from qatbench.tracking.tracker import Tracker

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as a > 2 GiB graph
    monkeypatch.setattr(onnx_model, "LEAN_LOG_BYTES", 0)  # as a > 256 MiB graph
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    path = onnx_export.export_onnx(model, (torch.zeros(1, 64),), tmp_path / "trial" / "model.onnx")
    trial = "mlp-fp32-fp32-onnxruntime"
    result = TrialResult(
        id=trial, model="mlp", method="fp32", bits="fp32", runtime="onnxruntime",
        status="finished", metrics={}, artifacts={"onnx": str(path)},
    )  # fmt: skip
    tracker = Tracker(None, "large", root=tmp_path)
    tracker.log_trial(result, params={})
    client = MlflowClient(tracking_uri=tracker.uri)
    (logged,) = client.search_logged_models(experiment_ids=[tracker.experiment_id])
    folder = Path(logged.artifact_location.removeprefix("file://"))
    assert (folder / "model.onnx").samefile(path)
    data = path.with_name("model.onnx.data")
    assert (folder / data.name).read_bytes() == data.read_bytes()
    assert not (folder / data.name).samefile(data)
    x = torch.randn(4, 64)
    loaded = mlflow.onnx.load_model(str(folder))  # MLflow's loader, weights from the link
    import onnxruntime as ort

    session = ort.InferenceSession(loaded.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_a_kept_graph_is_one_file_again_byte_for_byte_what_onnx_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """store_inline folds the data file into the graph tensor by tensor, and the file is
    exactly what onnx.save writes for the loaded graph (so MLflow's copy can be linked)."""
    from qatbench.runtimes import onnx_weights

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    path = onnx_export.export_onnx(model, (torch.zeros(1, 64),), tmp_path / "model.onnx")
    onnx_export.write_metadata(path, {"qatbench.method": "fp32"})
    assert path.with_name("model.onnx.data").exists()
    structure = onnx_weights.load_structure(path)
    assert onnx_weights.weight_bytes(structure) >= (64 * 128 + 128 * 8) * 4
    assert onnx_weights.store_inline(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    loaded = onnx.load(str(path))
    assert path.read_bytes() == loaded.SerializeToString()
    assert {p.key: p.value for p in loaded.metadata_props}["qatbench.method"] == "fp32"
    # read back without loading: each weight points into the file itself, at its bytes
    lazy = onnx_weights.load_structure(path)
    for tensor, full in zip(lazy.graph.initializer, loaded.graph.initializer, strict=True):
        got = onnx.numpy_helper.to_array(tensor, str(tmp_path))
        np.testing.assert_array_equal(got, onnx.numpy_helper.to_array(full))
    monkeypatch.setattr(onnx_weights, "INLINE_LIMIT_BYTES", 0)
    path2 = onnx_export.export_onnx(model, (torch.zeros(1, 64),), tmp_path / "b" / "model.onnx")
    assert not onnx_weights.store_inline(path2)  # too large for one message: stays external
    assert path2.with_name("model.onnx.data").exists()
