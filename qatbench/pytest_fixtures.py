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
need no opt-in: a test asks for them by name.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from qatbench.errors import ConfigError, QatbenchError
from qatbench.pytest_session import ExperimentRun, session_state
from qatbench.pytest_trial_results import TrialFailed, fail_on, result_properties

if TYPE_CHECKING:
    import torch

    from qatbench.results import TrialResult
    from qatbench.spec import ExperimentSpec, TrialSpec

# Keyword settings of qatbench.run() go to the experiment's ``data`` or ``measure`` section.
DATA_KEYS = ("dataset", "calibration_samples", "eval_samples", "batch_size", "pretrain_epochs")
MEASURE_KEYS = (
    "batch_sizes",
    "warmup_s",
    "min_round_s",
    "min_rounds",
    "max_time_s",
    "threads",
    "per_layer",
)
# pytest-benchmark's statistics, in seconds, logged to MLflow in milliseconds.
BENCHMARK_TIMES = ("min", "max", "mean", "median", "stddev", "iqr")


def experiment_spec(
    model: str | dict[str, Any],
    method: str | dict[str, Any],
    bits: str | None,
    runtime: str,
    *,
    experiment: str,
    options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    expect: Sequence[str] = (),
    seed: int = 0,
    timeout_s: float = 900.0,
    source: str = "<qatbench fixture>",
    **settings: Any,
) -> tuple[ExperimentSpec, TrialSpec]:
    """A one-trial experiment, validated like a YAML file, and its trial.

    ``model`` is a registered name, a ``package.module:function`` factory or a mapping as in
    YAML; ``method`` a name or a mapping; ``settings`` are keys of the YAML's ``data`` and
    ``measure`` sections (e.g. ``pretrain_epochs=1, batch_sizes=[1]``).
    """
    from qatbench.spec import validate_experiment

    data = {k: v for k, v in settings.items() if k in DATA_KEYS}
    measure = {k: v for k, v in settings.items() if k in MEASURE_KEYS}
    unknown = sorted(set(settings) - set(data) - set(measure))
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting {unknown[0]!r}; allowed: "
            f"{', '.join(DATA_KEYS + MEASURE_KEYS)}, options, model_options, expect, seed, "
            "timeout_s"
        )
    doc: dict[str, Any] = {
        "name": experiment,
        "models": [_model_entry(model, model_options)],
        "methods": [_method_entry(method, options)],
        "runtimes": [runtime],
        "data": data,
        "measure": measure,
        "seed": seed,
        "timeout_s": timeout_s,
        "expect": list(expect),
    }
    if bits is not None:
        doc["bits"] = [bits]
    spec = validate_experiment(doc, source=source)
    trials = spec.expand()
    if len(trials) != 1:  # validation refuses an empty grid; one of each axis makes one
        raise ConfigError(f"{source}: expected one trial, got {len(trials)}")
    return spec, trials[0]


def _model_entry(model: str | dict[str, Any], options: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any]
    if isinstance(model, dict):
        entry = dict(model)
    elif ":" in model:
        entry = {"name": model.rsplit(":", 1)[1], "factory": model}
    else:
        entry = {"name": model}
    if options:
        entry["options"] = {**entry.get("options", {}), **options}
    return entry


def _method_entry(method: str | dict[str, Any], options: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = dict(method) if isinstance(method, dict) else {"name": method}
    if options:
        entry["options"] = {**entry.get("options", {}), **options}
    return entry


def fail_one_line(message: str) -> NoReturn:
    """Fail the running test with ``message`` alone: no traceback, no chained exception."""
    raise pytest.fail.Exception(message, pytrace=False) from None


def _default_experiment(request: pytest.FixtureRequest) -> str:
    module = getattr(request.node, "module", None)
    name = module.__name__.rsplit(".", 1)[-1] if module is not None else "pytest"
    return re.sub(r"[^A-Za-z0-9_.]", "_", name).lstrip("_.") or "pytest"


class Qatbench:
    """The ``qatbench`` fixture: run trials from a test and log them to MLflow."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._state = session_state(request.config)
        self.experiment = _default_experiment(request)
        self.results: list[TrialResult] = []

    def run(
        self,
        model: str | dict[str, Any] = "mlp",
        method: str | dict[str, Any] = "fp32",
        bits: str | None = None,
        runtime: str = "torch",
        *,
        experiment: str | None = None,
        isolated: bool = True,
        check: bool = True,
        **settings: Any,
    ) -> TrialResult:
        """Run one trial, log it to MLflow and add it to the session's report.json.

        ``isolated`` runs it in a worker process (as ``qatbench run`` does); False runs it
        in this process. With ``check`` (the default) a failed trial or a breached
        expectation (``expect=[...]``) fails the test with one line; without it the
        result is returned whatever happened. Other keywords: see :func:`experiment_spec`.
        """
        from qatbench.trial import run_trial

        name = experiment or self.experiment
        try:
            spec, trial = experiment_spec(
                model,
                method,
                bits,
                runtime,
                experiment=name,
                source=self._request.node.nodeid,
                **settings,
            )
            run = self._experiment_run(name)
        except QatbenchError as exc:
            fail_one_line(str(exc))
        out_dir = run.trial_dir(trial.id)
        if isolated:
            result = self._state.executor.run(trial, out_dir, trial.timeout_s)
        else:
            result = run_trial(trial, out_dir)
        result = run.add(result, tags={"qatbench.pytest.nodeid": self._request.node.nodeid})
        self.results.append(result)
        self._request.node.user_properties.extend(result_properties(result, f"{result.id}."))
        if check:
            try:
                fail_on(spec, result)
            except TrialFailed as exc:
                fail_one_line(str(exc))
        return result

    __call__ = run

    def _experiment_run(self, name: str) -> ExperimentRun:
        return self._state.experiment(name, source=str(self._request.node.path))

    def log_benchmark(
        self,
        name: str,
        metrics: dict[str, float],
        *,
        experiment: str | None = None,
        tags: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> str:
        """Log a run that is not a trial (e.g. a pytest-benchmark timing); its run id."""
        run = self._experiment_run(experiment or self.experiment)
        all_tags = {
            **run.tags,
            "qatbench.kind": "benchmark",
            "qatbench.pytest.nodeid": self._request.node.nodeid,
            **(tags or {}),
        }
        artifacts = {"benchmark.json": json.dumps(details, indent=2)} if details else None
        return run.tracker.log_run(name, metrics=metrics, tags=all_tags, text_artifacts=artifacts)


@pytest.fixture
def qatbench(request: pytest.FixtureRequest) -> Qatbench:
    """Run a qatbench trial from a test: ``qatbench.run(model=, method=, bits=, runtime=,
    **settings) -> TrialResult``, logged to MLflow."""
    return Qatbench(request)


@pytest.fixture
def qatbench_trial(qatbench: Qatbench) -> Callable[..., TrialResult]:
    """``qatbench.run`` as a plain function."""
    return qatbench.run


# --- pytest-benchmark ----------------------------------------------------------------------


@dataclass
class QuantizedModel:
    """A converted model ready to call, an input batch, and its error against fp32.

    Unpacks as ``model, x = quantized``. ``model`` is the converted torch module (runtime
    ``torch``) or a function running the exported graph in onnxruntime (``onnxruntime``).
    """

    trial: TrialSpec
    model: Callable[..., Any]
    inputs: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.inputs))


def quantize(trial: TrialSpec, out_dir: Path, batch: int) -> QuantizedModel:
    """Build, pretrain (cached), prepare, calibrate, train and convert ``trial``'s model in
    this process, as a trial's worker does, and measure its output error on the evaluation
    set. For the onnxruntime runtime the model is exported and run by onnxruntime."""
    import torch

    from qatbench import registry
    from qatbench.bitwidth import BitWidth
    from qatbench.data.datasets import load_data
    from qatbench.data.training import forward_loop, pretrained, train_loop
    from qatbench.errors import PluginError
    from qatbench.measure import error as err
    from qatbench.runtimes import onnxruntime as ortrt
    from qatbench.spec import resolve_model_factory

    torch.set_num_threads(trial.measure.threads)
    torch.manual_seed(trial.seed)
    built = resolve_model_factory(trial.model)(**trial.model.options)
    if not (isinstance(built, tuple) and len(built) == 2):
        raise PluginError(f"model {trial.model.name!r}: factory must return (model, inputs)")
    fp32, example = built
    example = tuple(example) if isinstance(example, list | tuple) else (example,)
    data = load_data(trial.data, example[0], trial.seed)
    if data.labelled and trial.data.pretrain_epochs:
        key = {  # the worker's cache key: a trial and a benchmark share pretrained weights
            "model": trial.model.model_dump(exclude={"expect"}),
            "data": data.name,
            "epochs": trial.data.pretrain_epochs,
            "seed": trial.seed,
            "torch": torch.__version__,
        }
        fp32, _ = pretrained(
            fp32, key, data, trial.data.pretrain_epochs, trial.data.batch_size, trial.seed
        )
    fp32.eval()
    cls = registry.methods.get(trial.method.name)
    method = cls(cls.Config.model_validate(trial.method.options), BitWidth.parse(trial.bits))
    model = method.prepare(copy.deepcopy(fp32))
    if method.capabilities.needs_calibration:
        model = method.calibrate(model, forward_loop(data, trial.data.batch_size))
    if method.capabilities.needs_training:
        model = method.train(model, train_loop(data, trial.data.batch_size, trial.seed))
    model = method.convert(model).eval()
    run: Callable[[torch.Tensor], torch.Tensor] = model
    if trial.runtime == "onnxruntime":
        path = out_dir / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        method.export(model, example, path)
        run = ortrt.as_callable(ortrt.make_session(path, trial.measure.threads))
    with torch.inference_mode():
        reference = torch.cat([fp32(xb) for xb in data.eval_x.split(trial.data.batch_size)])
        outputs = torch.cat([run(xb) for xb in data.eval_x.split(trial.data.batch_size)])
    metrics = err.output_error(reference, outputs)
    if data.eval_y is not None:
        metrics["accuracy"] = err.accuracy_percent(outputs, data.eval_y)
        metrics["accuracy_delta_vs_fp32"] = metrics["accuracy"] - err.accuracy_percent(
            reference, data.eval_y
        )
    reps = -(-batch // len(data.eval_x))
    x = data.eval_x.repeat(reps, *([1] * (data.eval_x.dim() - 1)))[:batch].contiguous()
    return QuantizedModel(trial, run, x, metrics)


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
            model=trial.model.name,
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
