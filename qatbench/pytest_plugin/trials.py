"""The ``qatbench`` fixture's object: run a trial from a test as a YAML experiment would, log
it to MLflow, and fail the test in one line when it fails or breaches an expectation."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from qatbench.errors import QatbenchError
from qatbench.pytest_plugin.session import ExperimentRun, session_state
from qatbench.pytest_plugin.trial_results import TrialFailed, fail_on, result_properties
from qatbench.pytest_plugin.trial_spec import experiment_spec

if TYPE_CHECKING:
    from qatbench.results import TrialResult


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
        from qatbench.trial.lifecycle import run_trial

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
