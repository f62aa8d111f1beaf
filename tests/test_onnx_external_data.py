"""A large graph is saved as one file and one external-data file, whatever the exporter
wrote, and stays loadable through metadata rewrites and by onnxruntime."""

from __future__ import annotations

from pathlib import Path

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
