"""The ``quantized_benchmark`` fixture's object: pytest-benchmark's ``benchmark`` for a
quantized model, whose statistics also go to MLflow when the test ends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qatbench.errors import QatbenchError
from qatbench.pytest_plugin.trial_spec import experiment_spec
from qatbench.pytest_plugin.trials import Qatbench, fail_one_line
from qatbench.trial.in_process import QuantizedModel, quantize

# pytest-benchmark's statistics, in seconds, logged to MLflow in milliseconds.
BENCHMARK_TIMES = ("min", "max", "mean", "median", "stddev", "iqr")


class QuantizedBenchmark:
    """The ``quantized_benchmark`` fixture: pytest-benchmark's ``benchmark`` for quantized
    models, whose statistics also go to MLflow when the test ends."""

    def __init__(self, benchmark: Any, qatbench: Qatbench) -> None:
        self.benchmark = benchmark
        self.qatbench = qatbench
        self.quantized: QuantizedModel | None = None
        self.experiment: str | None = None

    def quantize(
        self,
        model: str | dict[str, Any] = "mlp",
        method: str | dict[str, Any] = "ptq",
        bits: str | None = None,
        runtime: str = "torch",
        *,
        batch: int = 1,
        experiment: str | None = None,
        **settings: Any,
    ) -> QuantizedModel:
        """A converted model and an input batch of ``batch`` samples, built in this process
        from the same settings as :meth:`Qatbench.run` takes."""
        self.experiment = experiment or self.qatbench.experiment
        node = self.qatbench._request.node
        try:
            _, trial = experiment_spec(
                model,
                method,
                bits,
                runtime,
                experiment=self.experiment,
                source=node.nodeid,
                **settings,
            )
            out_dir = self.qatbench._experiment_run(self.experiment).run_dir / "benchmarks"
            self.quantized = quantize(trial, out_dir / trial.id, batch)
        except QatbenchError as exc:
            fail_one_line(str(exc))
        info = self.benchmark.extra_info
        info.update(
            trial_id=trial.id,
            model=trial.model.key,
            method=trial.method.name,
            bits=trial.bits,
            runtime=trial.runtime,
            batch=batch,
        )
        info.update({k: round(v, 6) for k, v in self.quantized.metrics.items()})
        return self.quantized

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``benchmark(function, *args, **kwargs)`` with autograd off."""
        import torch

        with torch.inference_mode():
            return self.benchmark(function, *args, **kwargs)

    def pedantic(self, target: Callable[..., Any], **kwargs: Any) -> Any:
        """``benchmark.pedantic(...)`` with autograd off."""
        import torch

        with torch.inference_mode():
            return self.benchmark.pedantic(target, **kwargs)

    def log(self) -> str | None:
        """Log the benchmark's statistics (and the quantized model's error) to MLflow."""
        stats = getattr(self.benchmark, "stats", None)
        if not stats or getattr(self.benchmark, "has_error", False):
            return None  # not run, --benchmark-disable, or it raised
        s = stats.stats
        metrics = {f"bench_{k}_ms": float(getattr(s, k)) * 1e3 for k in BENCHMARK_TIMES}
        metrics |= {
            "bench_rounds": float(s.rounds),
            "bench_iterations": float(stats.iterations),
            "bench_ops_per_s": float(s.ops),
        }
        tags: dict[str, str] = {"benchmark.name": str(self.benchmark.name)}
        name = str(self.benchmark.name)
        if self.quantized is not None:
            trial = self.quantized.trial
            name = trial.id
            metrics |= self.quantized.metrics
            tags |= {
                "qatbench.trial_id": trial.id,
                "model": trial.model.name,
                "method": trial.method.name,
                "bits": trial.bits,
                "runtime": trial.runtime,
            }
        if self.benchmark.group:
            tags["benchmark.group"] = str(self.benchmark.group)
        details = {"stats": s.as_dict(), "extra_info": self.benchmark.extra_info}
        return self.qatbench.log_benchmark(
            name, metrics, experiment=self.experiment, tags=tags, details=details
        )
