"""Helpers shared by the sweep tests (runner, resume, sync, invalid corpus).

``FakeExecutor`` stands in for the worker pool where a test is about the runner's
bookkeeping (folders, report.json, MLflow runs, interruptions), not about measuring: it
returns a made-up result at once. MLflow itself is always a real SQLite store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qatbench.results import TrialFailure, TrialResult
from qatbench.spec.schema import TrialSpec

QATBENCH = Path(sys.executable).with_name("qatbench")
DATA = Path(__file__).resolve().parent
TESTS = DATA.parent


class FakeExecutor:
    """Returns a made-up result for each trial without a worker; records what it ran.

    ``fail`` names trials that come back failed (as a crashed worker would report);
    ``before(trial_id)`` runs first and may raise (KeyboardInterrupt: a Ctrl-C mid-trial).
    """

    def __init__(
        self,
        fail: frozenset[str] = frozenset(),
        before: Callable[[str], None] | None = None,
    ) -> None:
        self.fail, self.before = fail, before
        self.ran: list[str] = []
        self.stopped = 0

    def run(self, trial: TrialSpec, out_dir: Path, timeout_s: float) -> TrialResult:
        if self.before is not None:
            self.before(trial.id)
        self.ran.append(trial.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        failed = trial.id in self.fail
        return TrialResult(
            id=trial.id,
            model=trial.model.name,
            method=trial.method.name,
            bits=trial.bits,
            runtime=trial.runtime,
            status="failed" if failed else "finished",
            metrics={} if failed else {"size_bytes": 1000.0 + len(self.ran), "mse": 0.01},
            phases={"build_s": 0.01},
            params={"method": {"name": trial.method.name}, "bits": trial.bits},
            error=TrialFailure("convert", "worker process killed by SIGABRT") if failed else None,
        )

    def stop(self) -> None:
        self.stopped += 1


def write_experiment(
    path: Path,
    name: str,
    uri: str,
    *,
    models: str = "[{name: mlp, options: {hidden: [32]}}]",
    methods: str = "[fp32, ptq]",
    bits: str = "[w8a8, w4a8]",
    runtimes: str = "[torch]",
    dataset: str = "synthetic",
    extra: str = "",
) -> Path:
    """A seconds-per-trial experiment: a 784-32-10 MLP, tiny data and timing settings."""
    path.write_text(
        textwrap.dedent(f"""\
        name: {name}
        models: {models}
        methods: {methods}
        bits: {bits}
        runtimes: {runtimes}
        data: {{dataset: {dataset}, pretrain_epochs: 1, eval_samples: 64,
                calibration_samples: 32}}
        measure: {{batch_sizes: [1], max_time_s: 0.2, min_rounds: 5, warmup_s: 0.01,
                   per_layer: false}}
        tracking: {{uri: "{uri}"}}
        timeout_s: 120
        """)
        + extra
    )
    return path


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder.resolve() / 'mlflow.db'}"


def qatbench(
    *args: str | Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """The installed console script, run to completion in ``cwd``."""
    return subprocess.run(
        [str(QATBENCH), *map(str, args)],
        cwd=cwd,
        env=cli_env(cwd, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_env(tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment with ``extra``; a PYTHONPATH in ``extra`` goes
    before the session's (which carries the migrated MLflow template, see conftest)."""
    extra = dict(extra or {})
    if "PYTHONPATH" in extra and os.environ.get("PYTHONPATH"):
        extra["PYTHONPATH"] = os.pathsep.join([extra["PYTHONPATH"], os.environ["PYTHONPATH"]])
    return {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "QATBENCH_CACHE": str(tmp / "cache"),
        **extra,
    }


def report_trials(path: Path) -> list[dict[str, Any]]:
    """The trials of a report.json as written (a torn read would raise: it must not)."""
    try:
        return list(json.loads(path.read_text())["trials"])
    except FileNotFoundError:
        return []


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def sweep_runs(uri: str, experiment: str, sweep: str) -> list[Any]:
    """Active MLflow runs of ``experiment`` tagged with ``sweep``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    return list(
        client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`qatbench.sweep` = '{sweep}'",
            max_results=1000,
        )
    )


def all_runs(uri: str, experiment: str) -> list[Any]:
    """Every active MLflow run of ``experiment``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    return list(client.search_runs([found.experiment_id], max_results=1000))
