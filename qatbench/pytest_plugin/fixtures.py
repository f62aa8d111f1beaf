"""Fixtures for benchmarks written in Python: ``qatbench`` and ``quantized_benchmark``.

``qatbench.run(...)`` runs one trial, exactly as a YAML experiment would, logs it to MLflow
and returns its :class:`~qatbench.results.TrialResult`::

    def test_ptq_keeps_accuracy(qatbench):
        result = qatbench.run(model="mlp", method="ptq", bits="w8a8", runtime="onnxruntime",
                              pretrain_epochs=1, batch_sizes=[1], expect=["cosine > 0.99"])
        assert result.metrics["compression_ratio"] > 3

``quantized_benchmark`` times a quantized model with pytest-benchmark, so
``--benchmark-json``, ``--benchmark-autosave`` and ``--benchmark-compare`` work as usual; its
statistics are logged to MLflow as well::

    def test_ptq_latency(quantized_benchmark):
        model, x = quantized_benchmark.quantize("mlp", "ptq", bits="w8a8", batch=1)
        quantized_benchmark(model, x)        # == benchmark(model, x), under inference_mode

Both log to the MLflow experiment named after the test module unless ``experiment=`` says
otherwise, in the store that ``--qatbench-tracking-uri`` or the ini option
``qatbench_tracking_uri`` names (default ``sqlite:///mlruns/mlflow.db``). These fixtures
need no opt-in: a test asks for them by name. This module holds the fixtures only; what
they return is :class:`~qatbench.pytest_plugin.trials.Qatbench` and
:class:`~qatbench.pytest_plugin.quantized_benchmark.QuantizedBenchmark`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from qatbench.errors import QatbenchError
from qatbench.pytest_plugin.quantized_benchmark import QuantizedBenchmark
from qatbench.pytest_plugin.trials import Qatbench

if TYPE_CHECKING:
    from qatbench.results import TrialResult


@pytest.fixture
def qatbench(request: pytest.FixtureRequest) -> Qatbench:
    """Run a qatbench trial from a test: ``qatbench.run(model=, method=, bits=, runtime=,
    **settings) -> TrialResult``, logged to MLflow."""
    return Qatbench(request)


@pytest.fixture
def qatbench_trial(qatbench: Qatbench) -> Callable[..., TrialResult]:
    """``qatbench.run`` as a plain function."""
    return qatbench.run


@pytest.fixture
def quantized_benchmark(benchmark: Any, qatbench: Qatbench) -> Iterator[QuantizedBenchmark]:
    """pytest-benchmark's ``benchmark`` plus ``.quantize(...)``; statistics go to MLflow."""
    import torch

    threads = torch.get_num_threads()
    fixture = QuantizedBenchmark(benchmark, qatbench)
    try:
        yield fixture
        try:
            run_id = fixture.log()
        except QatbenchError as exc:  # as for trials: an unreachable store is a warning
            warnings.warn(f"{fixture.benchmark.name}: not logged to MLflow: {exc}", stacklevel=1)
            run_id = None
        if run_id:
            qatbench._request.node.user_properties.append(("benchmark_mlflow_run_id", run_id))
    finally:
        torch.set_num_threads(threads)
