"""Trials in their own worker process: results, crashes and timeouts become results."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qatbench.results import TrialResult
from qatbench.spec.schema import TrialSpec, validate_experiment
from qatbench.sweep.executor import LocalProcessExecutor

# The worker imports the factory module by name, with the sys.path its forkserver copied
# from this process when it started. pytest puts tests/ on sys.path (the rootdir conftest,
# "prepend" import mode) before any test runs, so ``data.crashy_methods`` resolves there
# whichever test started the forkserver; tests/data itself would only be on the path if
# added before that start.
TESTS_DIR = Path(__file__).parent
FACTORY = "data.crashy_methods:build"

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
        for n in (1, 4)
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


@pytest.fixture(scope="module")
def crashy() -> Iterator[Any]:
    """The crashy methods, registered here for validation (the worker registers its own)."""
    if str(TESTS_DIR) not in sys.path:
        pytest.skip("tests/ is not on sys.path (pytest run with --import-mode=importlib?)")
    from data import crashy_methods

    crashy_methods.register()
    yield crashy_methods
    crashy_methods.unregister()


def _trial(method: str, model: dict[str, Any], dataset: str = "digits") -> TrialSpec:
    # pretrain_epochs 0: the worker's environment is the forkserver's, fixed when it
    # started, so a QATBENCH_CACHE set by this test would not reach it.
    data = {
        "name": "tiny_executor",
        "models": [model],
        "methods": [method],
        "bits": ["w8a8"],
        "runtimes": ["torch"],
        "artifacts": ["onnx", "torch"],
        "data": {
            "dataset": dataset,
            "pretrain_epochs": 0,
            "eval_samples": 64,
            "calibration_samples": 32,
        },
        "measure": {"batch_sizes": [1, 4], "max_time_s": 0.2, "min_rounds": 5, "warmup_s": 0.01},
    }
    (trial,) = validate_experiment(data, source="t").expand()
    return trial


def _crashy_trial(method: str) -> TrialSpec:
    # synthetic data: no scikit-learn import, so the worker reaches convert well within 3 s
    model = {"name": "crashy", "factory": FACTORY, "options": {"hidden": [32]}}
    return _trial(method, model, dataset="synthetic")


def test_runs_a_trial_in_a_worker(tmp_path: Path) -> None:
    trial = _trial("fp32", {"name": "mlp", "options": {"hidden": [32]}})
    result = LocalProcessExecutor().run(trial, tmp_path / trial.id, timeout_s=120)
    assert isinstance(result, TrialResult)
    assert result.status == "finished", result.error
    assert result.id == "mlp-fp32-fp32-torch"
    missing = [name for name in CANONICAL if name not in result.metrics]
    assert not missing
    assert result.metrics["peak_rss_bytes"] > 0
    assert Path(result.artifacts["torch"]).is_file()
    assert "measure_s" in result.phases


def test_worker_killed_by_signal_is_a_failed_result(crashy: Any, tmp_path: Path) -> None:
    trial = _crashy_trial("abort_in_convert")
    result = LocalProcessExecutor().run(trial, tmp_path, timeout_s=120)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.phase == "convert"
    assert "SIGABRT" in result.error.reason
    assert result.id == "crashy-abort_in_convert-w8a8-torch"


def test_timeout_is_a_failed_result_and_kills_the_worker(crashy: Any, tmp_path: Path) -> None:
    trial = _crashy_trial("sleep_in_convert")
    executor = LocalProcessExecutor()
    start = time.monotonic()
    result = executor.run(trial, tmp_path, timeout_s=3)
    elapsed = time.monotonic() - start
    assert result.status == "failed"
    assert result.error is not None
    assert "timed out" in result.error.reason
    assert result.error.phase == "convert"
    assert elapsed < 60  # the 120 s sleep was cut short (forkserver start-up included)
    assert executor._current is None  # the worker was killed and reaped
