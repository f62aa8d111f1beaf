"""OpenVINO as a runtime and NNCF as a peer method, end to end through ``qatbench run`` on
a tiny MLP: the precision the CPU plugin used is recorded in every trial, fp32 runs at f32
on ``openvino`` whatever the plugin's default, bf16 is its own named runtime, int8 graphs
run on integer layers, and nncf_ptq runs on onnxruntime and openvino alike. Without the
extras these tests skip, and validate rejects an experiment naming them in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from data.sweep_support import qatbench, report_trials, sqlite_uri, write_experiment

from qatbench.errors import ConfigError
from qatbench.methods import nncf_ptq
from qatbench.runtimes.openvino import INSTALL_HINT, OpenVino
from qatbench.spec.schema import load_experiment

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
HAS_NNCF = importlib.util.find_spec("nncf") is not None
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO, reason="openvino is not installed (extra 'openvino')"
)
needs_nncf = pytest.mark.skipif(not HAS_NNCF, reason="nncf is not installed (extra 'nncf')")


def _run(tmp_path: Path, name: str, methods: str, runtimes: str) -> dict[str, dict[str, Any]]:
    exp = write_experiment(
        tmp_path / "exp.yaml",
        name,
        sqlite_uri(tmp_path / "mlruns"),
        methods=methods,
        bits="[w8a8]",
        runtimes=runtimes,
    )
    proc = qatbench("run", exp, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (report,) = (tmp_path / "reports" / name).glob("*/report.json")
    trials = {t["id"]: t for t in report_trials(report)}
    assert all(t["status"] == "finished" for t in trials.values()), trials
    return trials


def _bf16_on_this_cpu() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@needs_openvino
@pytest.mark.slow
def test_openvino_runs_fp32_at_f32_and_bf16_as_its_own_runtime(tmp_path: Path) -> None:
    trials = _run(tmp_path, "ov", "[fp32, ort_static]", "[openvino, openvino_bf16]")
    assert set(trials) == {
        "mlp-fp32-fp32-openvino",
        "mlp-fp32-fp32-openvino_bf16",
        "mlp-ort_static-w8a8-openvino",
        "mlp-ort_static-w8a8-openvino_bf16",
    }
    fp32 = trials["mlp-fp32-fp32-openvino"]
    settings = fp32["details"]["runtime_settings"]
    assert settings["inference_precision"] == "f32" and settings["precision_hint"] == "f32"
    assert settings["threads"] == 1 and settings["streams"] == 1
    assert fp32["params"]["runtime_settings"]["inference_precision"] == "f32"
    assert fp32["metrics"]["int_op_fraction"] == 0
    assert fp32["metrics"]["cosine"] > 0.9999  # f32: the same numbers as torch
    assert fp32["metrics"]["speedup_vs_fp32_b1"] > 0
    assert set(fp32["details"]["runtime_layers"]) == {"FullyConnected f32"}

    bf16 = trials["mlp-fp32-fp32-openvino_bf16"]
    used = bf16["details"]["runtime_settings"]["inference_precision"]
    assert bf16["details"]["runtime_settings"]["precision_hint"] == "bf16"
    if _bf16_on_this_cpu():
        assert used == "bf16"
        assert set(bf16["details"]["runtime_layers"]) == {"FullyConnected bf16"}
        assert bf16["metrics"]["max_abs_error"] > 0  # bf16 rounds: not torch's numbers
    else:  # the plugin falls back to f32, and the trial says so
        assert used == "f32"
        assert any("computes in f32" in w for w in bf16["details"]["warnings"])

    int8 = trials["mlp-ort_static-w8a8-openvino"]["metrics"]
    assert int8["int_op_fraction"] > 0 and int8["cosine"] > 0.99
    assert int8["size_bytes"] == int8["onnx_size_bytes"]


@needs_openvino
@needs_nncf
@pytest.mark.slow
def test_nncf_ptq_runs_on_onnxruntime_and_openvino(tmp_path: Path) -> None:
    methods = "[{name: nncf_ptq, options: {preset: mixed, subset_size: 16}}]"
    trials = _run(tmp_path, "nncf", methods, "[torch, onnxruntime, openvino]")
    # a graph-only method: no trial on torch
    assert set(trials) == {"mlp-nncf_ptq-w8a8-onnxruntime", "mlp-nncf_ptq-w8a8-openvino"}
    for trial in trials.values():
        m = trial["metrics"]
        assert m["compression_ratio"] > 2.5 and m["cosine"] > 0.99
    ov = trials["mlp-nncf_ptq-w8a8-openvino"]
    # OpenVINO runs every QDQ layer in int8; onnxruntime's optimised graph keeps some of
    # NNCF's in floating point, so its share is whatever it reports.
    assert ov["metrics"]["int_op_fraction"] == 1
    assert ov["details"]["runtime_settings"]["inference_precision"] == "f32"
    assert any(layer.endswith(("i8", "u8")) for layer in ov["details"]["runtime_layers"])


def _experiment(tmp_path: Path, methods: str, runtimes: str) -> Path:
    return write_experiment(
        tmp_path / "exp.yaml",
        "missing",
        sqlite_uri(tmp_path),
        methods=methods,
        bits="[w8a8]",
        runtimes=runtimes,
    )


def test_a_missing_openvino_is_one_line_at_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OpenVino, "unavailable_reason", classmethod(lambda cls: INSTALL_HINT))
    exp = _experiment(tmp_path, "[fp32]", "[onnxruntime, openvino]")
    with pytest.raises(ConfigError) as caught:
        load_experiment(exp)
    assert str(caught.value) == (
        f"{exp}: runtimes[1]: runtime 'openvino' cannot run here: {INSTALL_HINT}"
    )


def test_a_missing_nncf_is_one_line_at_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert nncf_ptq.unavailable_reason() == nncf_ptq.INSTALL_HINT
    exp = _experiment(tmp_path, "[fp32, nncf_ptq]", "[onnxruntime]")
    with pytest.raises(ConfigError, match=r"methods\[1\]\.name: method 'nncf_ptq' cannot run"):
        load_experiment(exp)
