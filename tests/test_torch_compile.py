"""The ``torch_compile`` runtime: capabilities in the grid, the compile phase and its
metrics, ratios against eager and compiled fp32, and a failing compile as a result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from data.trial_support import run_here

from qatbench import registry
from qatbench.errors import ConfigError
from qatbench.results import TrialResult
from qatbench.runtimes import torch_compile as tc
from qatbench.spec.schema import TrialSpec, validate_experiment

BATCHES = (1, 8)
COMPILABLE = {
    "fp32",
    "bf16",
    "fp16",
    "rtn",
    "gptq",
    "awq",
    "fake_quant",
    "naive_int8",
    "torchao_int8_dynamic",
    "torchao_int8_weight_only",
}


def experiment(methods: list[Any], runtimes: list[str]) -> dict[str, Any]:
    return {
        "name": "compiled",
        "models": [{"name": "linear", "options": {"in_features": 64, "out_features": 32}}],
        "methods": methods,
        "bits": ["w8"],
        "runtimes": runtimes,
        "data": {"dataset": "synthetic", "eval_samples": 20, "calibration_samples": 16},
        "measure": {
            "batch_sizes": list(BATCHES),
            "max_time_s": 0.05,
            "min_rounds": 3,
            "warmup_s": 0.0,
            "per_layer": False,
        },
    }


def trials_of(data: dict[str, Any]) -> dict[str, TrialSpec]:
    return {t.id: t for t in validate_experiment(data, source="t").expand()}


def test_methods_declare_torch_compile_where_inductor_compiles_them() -> None:
    declared = {
        name
        for name in registry.methods.names()
        if "compilable" in registry.methods.get(name).capabilities.artifacts
    }
    assert declared == COMPILABLE
    # fbgemm-backed layers (quantized tensors) and ORT-only quantizers are left out.
    assert not declared & {"ptq", "dynamic", "qat", "smoothquant", "ort_dynamic", "ort_int4"}


def test_grid_leaves_out_methods_that_do_not_compile() -> None:
    methods = ["fp32", {"name": "dynamic", "bits": ["w8a8"]}, "rtn"]
    ids = set(trials_of(experiment(methods, ["torch", "torch_compile"])))
    assert "linear-dynamic-w8a8-torch_compile" not in ids
    assert {"linear-fp32-fp32-torch_compile", "linear-rtn-w8-torch_compile"} <= ids
    assert "linear-dynamic-w8a8-torch" in ids


def test_method_without_torch_compile_alone_is_a_config_error() -> None:
    data = experiment([{"name": "ptq", "bits": ["w8a8"]}], ["torch_compile"])
    with pytest.raises(ConfigError, match="runs on none of \\['torch_compile'\\]"):
        validate_experiment(data, source="t")


def test_unknown_runtime_is_rejected_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="torch_compile"):
        validate_experiment(experiment(["fp32"], ["torch_compiled"]), source="t")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrialResult]:
    out = tmp_path_factory.mktemp("compiled")
    trials = trials_of(experiment(["fp32", "rtn"], ["torch", "torch_compile"]))
    return {tid: run_here(trial, out / tid) for tid, trial in trials.items()}


@pytest.mark.parametrize("tid", ["linear-fp32-fp32-torch_compile", "linear-rtn-w8-torch_compile"])
def test_compile_is_its_own_phase_and_metric(results: dict[str, TrialResult], tid: str) -> None:
    result = results[tid]
    assert result.status == "finished", result.error
    phases = list(result.phases)
    assert phases.index("export_s") < phases.index("compile_s") < phases.index("measure_s")
    m = result.metrics
    assert 0 < m["compile_time_s"] <= result.phases["compile_s"]
    assert m["fp32_compile_time_s"] > 0
    assert m["compile_graph_breaks"] == 0
    assert result.details["compile"]["mode"] == "default"
    assert result.details["compile"]["dynamic"] is False
    assert result.details["compile"]["graphs"] >= len(BATCHES)  # one per static shape
    assert not any("recompiled" in w for w in result.details.get("warnings", []))


@pytest.mark.parametrize("tid", ["linear-fp32-fp32-torch_compile", "linear-rtn-w8-torch_compile"])
def test_ratios_against_eager_and_compiled_fp32(results: dict[str, TrialResult], tid: str) -> None:
    m = results[tid].metrics
    samples = results[tid].details["latency_samples"]
    for n in BATCHES:
        for value, low, high in (
            ("speedup_vs_fp32", "speedup_ci_low", "speedup_ci_high"),
            (
                "speedup_vs_fp32_compiled",
                "speedup_vs_fp32_compiled_ci_low",
                "speedup_vs_fp32_compiled_ci_high",
            ),
        ):
            assert 0 < m[f"{low}_b{n}"] <= m[f"{value}_b{n}"] <= m[f"{high}_b{n}"]
        assert m[f"fp32_compiled_latency_p50_ms_b{n}"] > 0
        assert {"candidate_ms", "fp32_ms", "fp32_compiled_ms"} <= set(samples[f"b{n}"])
    eager = results["linear-fp32-fp32-torch"].metrics
    assert "speedup_vs_fp32_compiled_b1" not in eager and "compile_time_s" not in eager


def test_compiled_outputs_match_eager(results: dict[str, TrialResult]) -> None:
    for method in ("fp32-fp32", "rtn-w8"):
        eager = results[f"linear-{method}-torch"].metrics
        compiled = results[f"linear-{method}-torch_compile"].metrics
        assert compiled["cosine"] == pytest.approx(eager["cosine"], abs=1e-4)
        assert compiled["compression_ratio"] == eager["compression_ratio"]
    assert results["linear-fp32-fp32-torch_compile"].metrics["max_abs_error"] < 1e-4


def test_failing_compile_fails_only_that_trial_in_phase_compile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(*_args: object, **_kwargs: object) -> Any:
        def call(_x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("inductor: C++ compile error\nlong compiler output")

        return call

    monkeypatch.setattr(tc.torch, "compile", broken)
    trials = trials_of(experiment(["fp32"], ["torch", "torch_compile"]))
    failed = run_here(trials["linear-fp32-fp32-torch_compile"], tmp_path / "compiled")
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.phase == "compile"
    assert failed.error.reason == (
        "torch.compile (inductor) failed: RuntimeError: inductor: C++ compile error"
    )
    assert "compile_s" not in failed.phases and "export_s" in failed.phases
    eager = run_here(trials["linear-fp32-fp32-torch"], tmp_path / "eager")
    assert eager.status == "finished"
