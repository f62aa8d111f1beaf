"""Runtimes are plugins: every registered runtime passes the contract kit, a runtime from
an outside package runs in an experiment with no change to qatbench, and a broken one is
caught naming what it broke."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from data.runtime_plugin import OrtBasic
from data.sweep_support import TESTS, qatbench, report_trials, sqlite_uri, write_experiment

from qatbench import registry
from qatbench.runtimes.base import TORCH_MODULE, Loaded, Runtime, RuntimeCapabilities
from qatbench.runtimes.contract import check_runtime


@pytest.mark.parametrize("name", registry.runtimes.names())
def test_registered_runtime_honours_contract(name: str) -> None:
    runtime = registry.runtimes.get(name)
    if runtime.unavailable_reason():
        pytest.skip(f"{name}: {runtime.unavailable_reason()}")  # an extra not installed
    check_runtime(runtime)


def test_an_outside_runtime_plugin_passes_the_kit() -> None:
    check_runtime(OrtBasic)


class _Negates(Runtime):
    name = "negates"
    capabilities = RuntimeCapabilities(artifact=TORCH_MODULE)

    def load(self, artifact: Any, inputs: Sequence[torch.Tensor]) -> Loaded:
        return Loaded(lambda x: -artifact(x))


class _NoLoad(Runtime):
    name = "no_load"
    capabilities = RuntimeCapabilities(artifact=TORCH_MODULE)


@pytest.mark.parametrize(
    ("cls", "pattern"),
    [(_Negates, "load\\(\\): differs from torch"), (_NoLoad, "load\\(\\) raised NotImplemented")],
)
def test_contract_violations_are_caught(cls: type[Runtime], pattern: str) -> None:
    with pytest.raises(AssertionError, match=pattern):
        check_runtime(cls)


def _install(site: Path) -> None:
    info = site / "qatbench_ort_basic-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qatbench-ort-basic\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[qatbench.runtimes]\nort_basic = data.runtime_plugin:OrtBasic\n"
    )


@pytest.mark.slow
def test_a_runtime_from_an_outside_package_runs_every_exporting_method(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _install(site)
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(TESTS)])}
    listed = qatbench("list", "runtimes", cwd=tmp_path, env={**env, "COLUMNS": "200"})
    assert listed.returncode == 0 and "ort_basic" in listed.stdout, listed.stderr
    exp = write_experiment(
        tmp_path / "exp.yaml",
        "outside_runtime",
        sqlite_uri(tmp_path / "mlruns"),
        methods="[fp32, ptq, {name: bf16, bits: [w16a16]}]",
        bits="[w8a8]",
        runtimes="[torch, ort_basic]",
    )
    proc = qatbench("run", exp, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (report,) = (tmp_path / "reports" / "outside_runtime").glob("*/report.json")
    trials = {t["id"]: t for t in report_trials(report)}
    # bf16 exports no graph, so it runs on torch only; fp32 and ptq on both
    assert set(trials) == {
        "mlp-fp32-fp32-torch",
        "mlp-fp32-fp32-ort_basic",
        "mlp-ptq-w8a8-torch",
        "mlp-ptq-w8a8-ort_basic",
        "mlp-bf16-w16a16-torch",
    }
    assert all(t["status"] == "finished" for t in trials.values())
    ptq = trials["mlp-ptq-w8a8-ort_basic"]["metrics"]
    assert ptq["speedup_vs_fp32_b1"] > 0 and 0 < ptq["int_op_fraction"] <= 1
    assert ptq["size_bytes"] == ptq["onnx_size_bytes"]


def test_an_unknown_runtime_lists_the_known_ones(tmp_path: Path) -> None:
    exp = write_experiment(
        tmp_path / "exp.yaml", "bad_runtime", sqlite_uri(tmp_path), runtimes="[torch, tensorrt]"
    )
    proc = qatbench("validate", exp, cwd=tmp_path)
    assert proc.returncode == 2
    known = "onnxruntime, openvino, openvino_bf16, torch, torch_compile"
    assert f"runtimes[1]: unknown runtime 'tensorrt'; known runtimes: {known}" in proc.stderr
