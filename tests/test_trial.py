"""One trial's lifecycle in-process: every canonical metric, and failures as results."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from data.trial_support import run_here

from qatbench import registry
from qatbench.methods.base import Capabilities, QuantMethod
from qatbench.models.mlp import build_mlp
from qatbench.results import TrialResult
from qatbench.runtimes.onnx_export import export_onnx
from qatbench.spec.schema import TrialSpec, validate_experiment

BATCHES = (1, 4)
CANONICAL = [
    "size_bytes",
    "compression_ratio",
    "weight_bytes",
    "peak_rss_bytes",
    "mse",
    "max_abs_error",
    "sqnr_db",
    "cosine",
    "accuracy",
    "accuracy_delta_vs_fp32",
    "onnx_size_bytes",
    "onnx_parity_max_abs",
    "int_op_fraction",
    *[
        f"{m}_b{n}"
        for n in BATCHES
        for m in (
            "latency_p50_ms",
            "latency_p90_ms",
            "latency_p99_ms",
            "throughput_per_s",
            "speedup_vs_fp32",
            "speedup_ci_low",
            "speedup_ci_high",
        )
    ],
]


def tiny_experiment(methods: list[Any], **overrides: Any) -> dict[str, Any]:
    """A seconds-long experiment: a 784-32-10 MLP on digits, short timing rounds."""
    data = {
        "name": "tiny",
        "models": [{"name": "mlp", "options": {"hidden": [32]}}],
        "methods": methods,
        "bits": ["w8a8"],
        "runtimes": ["torch", "onnxruntime"],
        "data": {
            "dataset": "digits",
            "pretrain_epochs": 1,
            "eval_samples": 64,
            "calibration_samples": 32,
        },
        "measure": {
            "batch_sizes": list(BATCHES),
            "max_time_s": 0.2,
            "min_rounds": 5,
            "warmup_s": 0.01,
        },
    }
    data.update(overrides)
    return data


def trials_of(data: dict[str, Any]) -> dict[str, TrialSpec]:
    return {t.id: t for t in validate_experiment(data, source="t").expand()}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One pretraining cache for the module, set in the environment while it runs."""
    path = tmp_path_factory.mktemp("qatbench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QATBENCH_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def results(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrialResult]:
    """fp32 and ptq w8a8 on torch and onnxruntime, run in this process, keeping both
    kinds of artifact (by default a torch trial writes neither)."""
    out = tmp_path_factory.mktemp("trials")
    spec = tiny_experiment(["fp32", "ptq"], artifacts=["onnx", "torch"])
    return {tid: run_here(trial, out / tid) for tid, trial in trials_of(spec).items()}


def test_grid_is_the_expected_four(results: dict[str, TrialResult]) -> None:
    assert sorted(results) == [
        "mlp-fp32-fp32-onnxruntime",
        "mlp-fp32-fp32-torch",
        "mlp-ptq-w8a8-onnxruntime",
        "mlp-ptq-w8a8-torch",
    ]


@pytest.mark.parametrize(
    "tid",
    [
        "mlp-fp32-fp32-torch",
        "mlp-fp32-fp32-onnxruntime",
        "mlp-ptq-w8a8-torch",
        "mlp-ptq-w8a8-onnxruntime",
    ],
)
def test_finished_with_every_canonical_metric(results: dict[str, TrialResult], tid: str) -> None:
    result = results[tid]
    assert result.status == "finished", result.error
    assert result.error is None
    missing = [name for name in CANONICAL if name not in result.metrics]
    assert not missing, f"{tid} lacks {missing}"
    m = result.metrics
    assert all(isinstance(v, float) for v in m.values())
    for n in BATCHES:
        assert m[f"speedup_ci_low_b{n}"] <= m[f"speedup_vs_fp32_b{n}"]
        assert m[f"speedup_vs_fp32_b{n}"] <= m[f"speedup_ci_high_b{n}"]
        assert 0 < m[f"latency_p50_ms_b{n}"] <= m[f"latency_p90_ms_b{n}"]
        assert m[f"latency_p90_ms_b{n}"] <= m[f"latency_p99_ms_b{n}"]
        assert m[f"throughput_per_s_b{n}"] == pytest.approx(n / m[f"latency_p50_ms_b{n}"] * 1e3)
    assert m["peak_rss_bytes"] > 0 and m["size_bytes"] > 0 and m["weight_bytes"] > 0
    assert 0 <= m["accuracy"] <= 100
    assert 0 <= m["int_op_fraction"] <= 1
    assert m["onnx_export_ok"] == 1.0


@pytest.mark.parametrize(
    "tid",
    ["mlp-fp32-fp32-torch", "mlp-ptq-w8a8-onnxruntime"],
)
def test_phases_recorded(results: dict[str, TrialResult], tid: str) -> None:
    phases = results[tid].phases
    expected = [
        "build_s",
        "data_s",
        "pretrain_s",
        "reference_s",
        "prepare_s",
        "convert_s",
        "export_s",
        "measure_s",
    ]
    if "ptq" in tid:
        expected.insert(5, "calibrate_s")
    assert list(phases) == expected
    assert all(v >= 0 for v in phases.values())


def test_pretrained_weights_cached_once(results: dict[str, TrialResult], cache_dir: Path) -> None:
    assert len(list(cache_dir.glob("*.pt"))) == 1
    hits = [r.details.get("pretrained_from_cache") for r in results.values()]
    assert hits.count(False) == 1 and hits.count(True) == 3


def test_fp32_torch_is_the_reference(results: dict[str, TrialResult]) -> None:
    m = results["mlp-fp32-fp32-torch"].metrics
    assert m["mse"] == 0.0 and m["max_abs_error"] == 0.0
    assert m["sqnr_db"] == 400.0 and m["cosine"] == pytest.approx(1.0)
    assert m["compression_ratio"] == pytest.approx(1.0, abs=0.01)
    assert m["int_op_fraction"] == 0.0
    assert m["accuracy_delta_vs_fp32"] == 0.0
    assert m["accuracy"] > 50  # one epoch on digits learns something


def test_fp32_torch_compression_ratio_is_exactly_one(results: dict[str, TrialResult]) -> None:
    """The same state dict saved twice must weigh the same. torch.save writes the file's
    stem into every zip record name, so ``fp32_reference.pt`` is bigger than ``model.pt``."""
    m = results["mlp-fp32-fp32-torch"].metrics
    assert m["compression_ratio"] == 1.0


def test_fp32_onnxruntime_agrees_with_torch(results: dict[str, TrialResult]) -> None:
    m = results["mlp-fp32-fp32-onnxruntime"].metrics
    assert m["mse"] < 1e-8 and m["onnx_parity_max_abs"] < 1e-4
    assert m["int_op_fraction"] == 0.0


def test_ptq_runs_integer_kernels_in_onnxruntime(results: dict[str, TrialResult]) -> None:
    m = results["mlp-ptq-w8a8-onnxruntime"].metrics
    assert m["int_op_fraction"] > 0
    assert m["mse"] > 0 and m["sqnr_db"] > 10
    assert m["compression_ratio"] > 2


def test_ptq_torch_artifact_is_smaller(results: dict[str, TrialResult]) -> None:
    result = results["mlp-ptq-w8a8-torch"]
    m = result.metrics
    # counted as torch.save writes the state dict: the file differs by the name inside
    assert abs(Path(result.artifacts["torch"]).stat().st_size - m["size_bytes"]) < 1024
    assert m["compression_ratio"] > 2
    assert m["weight_bytes"] < results["mlp-fp32-fp32-torch"].metrics["weight_bytes"] / 2
    assert result.details["per_layer"][0]["type"] == "QuantizedLinear"


def test_onnx_compression_ratio_is_fp32_onnx_over_artifact(
    results: dict[str, TrialResult], cache_dir: Path, tmp_path: Path
) -> None:
    result = results["mlp-ptq-w8a8-onnxruntime"]
    artifact = Path(result.artifacts["onnx"])
    assert artifact.name == "model.onnx"
    on_disk = artifact.stat().st_size
    assert result.metrics["size_bytes"] == result.metrics["onnx_size_bytes"] == on_disk
    # The fp32 artifact of the same runtime, exported and labelled the same way.
    fp32_artifact = Path(results["mlp-fp32-fp32-onnxruntime"].artifacts["onnx"])
    fp32_bytes = fp32_artifact.stat().st_size
    assert result.metrics["compression_ratio"] == pytest.approx(fp32_bytes / on_disk, rel=1e-12)
    assert results["mlp-fp32-fp32-onnxruntime"].metrics["compression_ratio"] == 1.0
    # The same weights exported without qatbench's metadata differ by the labels alone.
    model, example = build_mlp(hidden=[32])
    (weights,) = cache_dir.glob("*.pt")
    model.load_state_dict(torch.load(weights, weights_only=True))
    bare = export_onnx(model.eval(), example, tmp_path / "fp32.onnx").stat().st_size
    assert 0 < fp32_bytes - bare < 1024
    leftovers = sorted(p.name for p in artifact.parent.iterdir())
    assert leftovers == ["input_example.npy", "model.onnx"]


def test_onnx_weight_bytes_count_the_integer_weights(results: dict[str, TrialResult]) -> None:
    """The 784x32 + 32x10 int8 weights are resident in the onnxruntime session."""
    weights = 784 * 32 + 32 * 10
    assert results["mlp-ptq-w8a8-onnxruntime"].metrics["weight_bytes"] >= weights
    assert results["mlp-ptq-w8a8-torch"].metrics["weight_bytes"] >= weights


# ---- failures are results ------------------------------------------------------------


class _ConvertReturnsNone(QuantMethod):
    name = "convert_returns_none"
    capabilities = Capabilities(weight_bits=frozenset({8}), activation_bits=frozenset({8}))

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        return None  # type: ignore[return-value]  # the contract violation under test


class _CalibrateRaises(QuantMethod):
    name = "calibrate_raises"
    capabilities = Capabilities(
        weight_bits=frozenset({8}), activation_bits=frozenset({8}), needs_calibration=True
    )

    def calibrate(self, model: torch.nn.Module, forward_loop: object) -> torch.nn.Module:
        raise ValueError("calibration ranges are empty\nsecond line of detail")


class _InitRaises(QuantMethod):
    name = "init_raises"
    capabilities = Capabilities(weight_bits=frozenset({8}), activation_bits=frozenset({8}))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("cannot set up")


BROKEN = (_ConvertReturnsNone, _CalibrateRaises, _InitRaises)


@pytest.fixture
def broken_methods() -> Iterator[None]:
    for cls in BROKEN:
        registry.methods.register(cls.name, cls)
    yield
    for cls in BROKEN:
        registry.methods.unregister(cls.name)


@pytest.mark.parametrize(
    ("method", "phase", "reason"),
    [
        (
            "convert_returns_none",
            "convert",
            "method 'convert_returns_none': convert() returned NoneType, not the model",
        ),
        ("calibrate_raises", "calibrate", "ValueError: calibration ranges are empty"),
    ],
)
def test_failing_method_is_a_failed_result(
    broken_methods: None, cache_dir: Path, tmp_path: Path, method: str, phase: str, reason: str
) -> None:
    (trial,) = trials_of(tiny_experiment([method], runtimes=["torch"])).values()
    result = run_here(trial, tmp_path)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.phase == phase
    assert result.error.reason == reason
    assert "\n" not in result.error.reason
    assert f"{phase}_s" not in result.phases and "prepare_s" in result.phases
    assert "traceback" in result.details
    assert TrialResult.from_dict(result.to_dict()) == result


def test_method_setup_failure_is_not_blamed_on_reference(
    broken_methods: None, cache_dir: Path, tmp_path: Path
) -> None:
    """The method is looked up and instantiated after the ``reference`` phase ends and
    before ``prepare`` starts, so its failure is reported in phase ``reference``."""
    (trial,) = trials_of(tiny_experiment(["init_raises"], runtimes=["torch"])).values()
    result = run_here(trial, tmp_path)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.reason == "RuntimeError: cannot set up"
    assert result.error.phase == "prepare"
