"""The single-Linear workloads (``linear``, ``linear4096``) end to end on synthetic data:
compression_ratio is the ratio of the artifacts' bytes on disk, integer methods run
integer kernels, fp32 none, and the parity flag holds; ``naive_int8`` is the honest
dequantize-per-call reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from data.trial_support import run_here

from qatbench import registry
from qatbench.quant.naive_linear import NaiveInt8Linear
from qatbench.results import TrialResult
from qatbench.spec.schema import validate_experiment

SIZE = 256  # linear4096's shape, scaled down: one square Linear, groups of 128 divide it


def test_linear4096_is_registered_as_one_4096_square_linear() -> None:
    model, (example,) = registry.models.get("linear4096")()
    (layer,) = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert (layer.in_features, layer.out_features) == (4096, 4096)
    assert example.shape == (1, 4096)
    small, (x,) = registry.models.get("linear")(in_features=24, out_features=8, bias=False)
    assert small(torch.randn(3, 24)).shape == (3, 8) and x.shape == (1, 24)


def experiment(runtimes: list[str]) -> dict[str, Any]:
    return {
        "name": "linear",
        "models": [{"name": "linear", "options": {"in_features": SIZE, "out_features": SIZE}}],
        "methods": [
            "fp32",
            {"name": "ptq", "bits": ["w8a8"]},
            {"name": "dynamic", "bits": ["w8a8"]},
            {"name": "rtn", "bits": ["w4"], "options": {"group_size": 128}},
            {"name": "ort_int4", "bits": ["w4"], "options": {"block_size": 128}},
            {"name": "naive_int8", "bits": ["w8"]},
        ],
        "runtimes": runtimes,
        "artifacts": ["onnx", "torch"],
        "data": {"dataset": "synthetic", "eval_samples": 32, "calibration_samples": 32},
        "measure": {
            "batch_sizes": [1],
            "max_time_s": 0.02,
            "min_rounds": 3,
            "warmup_s": 0.0,
            "per_layer": False,
        },
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrialResult]:
    out = tmp_path_factory.mktemp("linear")
    trials = validate_experiment(experiment(["torch", "onnxruntime"]), source="t").expand()
    return {t.id: run_here(t, out / t.id) for t in trials}


def test_every_trial_finished(results: dict[str, TrialResult]) -> None:
    assert len(results) == 10
    for tid, result in results.items():
        assert result.status == "finished", (tid, result.error)


@pytest.mark.parametrize("method", ["ptq-w8a8", "dynamic-w8a8", "rtn-w4", "ort_int4-w4"])
def test_onnx_compression_ratio_is_the_ratio_of_bytes_on_disk(
    results: dict[str, TrialResult], method: str
) -> None:
    fp32 = Path(results["linear-fp32-fp32-onnxruntime"].artifacts["onnx"]).stat().st_size
    result = results[f"linear-{method}-onnxruntime"]
    candidate = Path(result.artifacts["onnx"]).stat().st_size
    assert result.metrics["size_bytes"] == candidate
    assert result.metrics["compression_ratio"] == fp32 / candidate
    assert results["linear-fp32-fp32-onnxruntime"].metrics["compression_ratio"] == 1.0
    low = 6 if method.endswith("w4") else 3.5  # int4 / int8 weights, fp32 scales and bias
    assert result.metrics["compression_ratio"] > low


@pytest.mark.parametrize("method", ["ptq-w8a8", "dynamic-w8a8", "rtn-w4", "naive_int8-w8"])
def test_torch_compression_ratio_is_the_ratio_of_bytes_on_disk(
    results: dict[str, TrialResult], method: str
) -> None:
    fp32 = Path(results["linear-fp32-fp32-torch"].artifacts["torch"]).stat().st_size
    result = results[f"linear-{method}-torch"]
    candidate = Path(result.artifacts["torch"]).stat().st_size
    # sized as torch.save writes the state dict, without the file's name in each record
    assert abs(result.metrics["size_bytes"] - candidate) < 1024
    assert result.metrics["compression_ratio"] == pytest.approx(fp32 / candidate, rel=1e-2)
    assert result.metrics["compression_ratio"] > 3


@pytest.mark.parametrize(
    "tid",
    [
        "linear-ptq-w8a8-torch",
        "linear-ptq-w8a8-onnxruntime",
        "linear-dynamic-w8a8-onnxruntime",
        "linear-rtn-w4-torch",
        "linear-rtn-w4-onnxruntime",
        "linear-ort_int4-w4-onnxruntime",
    ],
)
def test_integer_methods_run_integer_kernels(results: dict[str, TrialResult], tid: str) -> None:
    assert results[tid].metrics["int_op_fraction"] > 0


def test_torch_weight_only_runs_an_integer_weight_kernel(results: dict[str, TrialResult]) -> None:
    """w4 in groups of 128 runs int4pack_mm in torch: no weight dequantized per call."""
    details = results["linear-rtn-w4-torch"].details
    assert details["torch_kernels"] == {"int4pack_mm": 1}
    assert details["dequantizes_per_call"] is False


def test_an_evaluation_input_is_saved_as_the_onnx_input_example(
    results: dict[str, TrialResult],
) -> None:
    for tid in ("linear-fp32-fp32-onnxruntime", "linear-rtn-w4-torch"):
        artifacts = results[tid].artifacts
        saved = np.load(artifacts["onnx_input_example"])
        assert Path(artifacts["onnx_input_example"]).parent == Path(artifacts["onnx"]).parent
        assert saved.shape == (1, SIZE) and saved.dtype == np.float32
        assert np.abs(saved).sum() > 0  # a real (synthetic) sample, not the zero example


def test_fp32_runs_no_integer_kernel(results: dict[str, TrialResult]) -> None:
    for runtime in ("torch", "onnxruntime"):
        assert results[f"linear-fp32-fp32-{runtime}"].metrics["int_op_fraction"] == 0


def test_parity_flag_holds_where_torch_and_onnx_both_run(
    results: dict[str, TrialResult],
) -> None:
    ptq = results["linear-ptq-w8a8-onnxruntime"]
    assert ptq.metrics["onnx_parity_ok"] == 1.0
    assert ptq.details["onnx_parity_basis"] == "output_step"
    assert ptq.details["onnx_parity_steps"] == 1  # one Linear: one output step
    rtn = results["linear-rtn-w4-onnxruntime"]
    assert rtn.metrics["onnx_parity_ok"] == 1.0
    assert rtn.details["onnx_parity_basis"] == "relative"
    assert rtn.metrics["onnx_parity_max_abs"] <= rtn.metrics["onnx_parity_tolerance"]
    assert "onnx_parity_ok" not in results["linear-ort_int4-w4-onnxruntime"].metrics  # no torch


def test_naive_int8_stores_int8_and_dequantizes_per_call(results: dict[str, TrialResult]) -> None:
    result = results["linear-naive_int8-w8-torch"]
    assert result.details["simulated"] is True
    assert "onnx" not in result.artifacts  # torch only: onnxruntime would fold the dequantize
    assert result.metrics["cosine"] > 0.999
    state = torch.load(result.artifacts["torch"], weights_only=True)
    assert state["linear.weight_q"].dtype == torch.int8
    assert state["linear.weight_q"].shape == (SIZE, SIZE)
    # Every call rebuilds the fp32 weight from the integers: change them, the output follows.
    layer = NaiveInt8Linear.from_float(torch.nn.Linear(16, 4))
    x = torch.randn(2, 16)
    before = layer(x)
    layer.weight_q.zero_()
    assert layer.dequantizes_per_call and not torch.equal(before, layer(x))
    assert torch.allclose(layer(x), layer.bias.expand(2, 4))
    assert registry.methods.get("naive_int8").capabilities.artifacts == {
        "torch_module",
        "compilable",
    }
