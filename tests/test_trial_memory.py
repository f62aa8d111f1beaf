"""Memory in proportion to the model: copies share weights, torch trials export nothing
they were not asked for, and every trial reports its peak against the fp32 weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from data.trial_support import run_here

from qatbench.errors import ConfigError
from qatbench.measure.size import onnx_weight_bytes, torch_artifact_bytes
from qatbench.methods.fp32 import Fp32Method
from qatbench.methods.lifecycle import quantize_copy
from qatbench.methods.ptq import PtqMethod
from qatbench.models.copies import shared_copy, weight_bytes
from qatbench.quant.bitwidth import BitWidth
from qatbench.results import TrialResult
from qatbench.runtimes.onnx_export import export_onnx
from qatbench.spec.schema import validate_experiment


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most decoders
        self.norm = torch.nn.BatchNorm1d(4)
        self.norm.packed = torch.arange(3)  # a tensor kept as a plain attribute

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


def test_shared_copy_new_modules_same_tensors() -> None:
    model = _Tied()
    copied = shared_copy(model)
    assert copied is not model and copied.head is not model.head
    assert copied.embed.weight is model.embed.weight
    assert copied.head.weight is copied.embed.weight  # still tied
    assert copied.norm.running_mean is model.norm.running_mean
    assert copied.norm.packed is model.norm.packed
    copied.head = torch.nn.Linear(4, 10)  # replacing a module leaves the original alone
    assert model.head.weight is model.embed.weight


def test_weight_bytes_counts_tied_storage_once() -> None:
    model = _Tied()
    floats = 10 * 4 + 4 * 4  # embedding (= head), norm weight, bias, running mean and var
    assert weight_bytes(model) == floats * 4 + 8  # + num_batches_tracked (int64)


def _loops() -> dict[str, Any]:
    batches = [torch.randn(8, 16) for _ in range(2)]

    def run(model: torch.nn.Module) -> None:
        for batch in batches:
            model(batch)

    return {"forward_loop": lambda: run, "train_loop": lambda: run}


def test_a_method_that_keeps_weights_gets_fp32_storage_not_a_copy() -> None:
    fp32 = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
    method = Fp32Method(Fp32Method.Config(), BitWidth.parse("fp32"))
    assert method.capabilities.keeps_weights
    candidate = quantize_copy(method, fp32, **_loops())
    assert candidate is not fp32
    assert candidate[0].weight.data_ptr() == fp32[0].weight.data_ptr()


def test_other_methods_get_a_deep_copy() -> None:
    fp32 = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
    before = fp32[0].weight.detach().clone()
    method = PtqMethod(PtqMethod.Config(), BitWidth.parse("w8a8"))
    assert not method.capabilities.keeps_weights
    quantize_copy(method, fp32, **_loops())
    assert torch.equal(fp32[0].weight, before)


def test_torch_artifact_bytes_match_the_saved_file(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 64)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    assert abs(torch_artifact_bytes(model) - path.stat().st_size) < 256
    assert not list(tmp_path.glob("*archive*"))


def test_onnx_weight_bytes_read_external_data_sizes_without_loading(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)).eval()
    inline = export_onnx(model, (torch.randn(1, 32),), tmp_path / "inline" / "model.onnx")
    graph = onnx.load(str(inline))
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save(
        graph,
        str(external),
        save_as_external_data=True,
        location="weights.bin",
        all_tensors_to_one_file=True,
        size_threshold=0,
    )
    assert (external.parent / "weights.bin").stat().st_size > 0
    assert onnx_weight_bytes(external) == onnx_weight_bytes(inline) >= (32 * 64 + 64 * 8) * 4


def _experiment(**overrides: Any) -> dict[str, Any]:
    data = {
        "name": "memory",
        "models": [{"name": "mlp", "options": {"hidden": [32]}}],
        "methods": ["fp32"],
        "runtimes": ["torch", "onnxruntime"],
        "data": {"dataset": "synthetic", "eval_samples": 16, "calibration_samples": 16},
        "measure": {"batch_sizes": [1], "max_time_s": 0.05, "min_rounds": 3, "warmup_s": 0.0},
    }
    data.update(overrides)
    return data


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TrialResult, Path]]:
    """fp32 on torch and onnxruntime with the default artifacts."""
    out = tmp_path_factory.mktemp("memory")
    spec = validate_experiment(_experiment(), source="t")
    return {t.runtime: (run_here(t, out / t.id), out / t.id) for t in spec.expand()}


def test_a_torch_trial_writes_no_artifact_by_default(
    trials: dict[str, tuple[TrialResult, Path]],
) -> None:
    result, folder = trials["torch"]
    assert result.status == "finished", result.error
    assert result.artifacts == {}
    assert "skipped" in result.details["onnx_export"]
    assert "onnx_export_ok" not in result.metrics
    assert not list(folder.rglob("*.pt")) and not list(folder.rglob("*.onnx"))
    assert result.metrics["compression_ratio"] == 1.0  # fp32 counted as the candidate is


def test_a_graph_trial_keeps_its_graph_and_a_handful_of_files(
    trials: dict[str, tuple[TrialResult, Path]],
) -> None:
    result, folder = trials["onnxruntime"]
    assert result.status == "finished", result.error
    assert Path(result.artifacts["onnx"]).is_file()
    names = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert names == ["input_example.npy", "model.onnx"]


def test_peak_rss_is_reported_against_the_fp32_weights(
    trials: dict[str, tuple[TrialResult, Path]],
) -> None:
    for result, _folder in trials.values():
        m = result.metrics
        assert m["fp32_weight_bytes"] == (784 * 32 + 32 + 32 * 10 + 10) * 4
        assert m["peak_rss_vs_fp32_weights"] == pytest.approx(
            m["peak_rss_bytes"] / m["fp32_weight_bytes"]
        )
        phases = result.details["peak_rss_after_phase_bytes"]
        assert list(phases) == ["build", "convert", "export", "measure"]
        assert max(phases.values()) <= m["peak_rss_bytes"]


def test_artifacts_name_known_kinds_only() -> None:
    spec = validate_experiment(_experiment(artifacts=["torch"]), source="t")
    assert all(t.artifacts == frozenset({"torch"}) for t in spec.expand())
    with pytest.raises(ConfigError, match="artifacts"):
        validate_experiment(_experiment(artifacts=["safetensors"]), source="t")
