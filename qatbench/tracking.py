"""MLflow tracking: one run per trial, its metrics in one batch, the ONNX file and trial.json.

This is the only module of the package that imports mlflow, and only the parent process
imports it: workers return plain :class:`~qatbench.results.TrialResult` data and the parent
logs it here. The embedded default store keeps everything under ``mlruns/``: an SQLite
database (``mlruns/mlflow.db``) next to an artifact folder (``mlruns/artifacts``). Any other
MLflow tracking URI (e.g. a shared ``mlflow server``) works the same way.

Every failure to reach or write the store is raised as a one-line
:class:`~qatbench.errors.TrackingError`.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import math
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported

from mlflow import MlflowClient  # must follow the telemetry opt-out
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from qatbench.errors import TrackingError
from qatbench.results import TrialResult

DEFAULT_DIR = "mlruns"
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "artifacts"
REACHABILITY_TIMEOUT_S = 5.0
_SQLITE_PREFIX = "sqlite:///"


def default_uri(root: Path | None = None) -> str:
    """The embedded store under ``<root>/mlruns`` (``root`` defaults to the working directory)."""
    db = (Path(root) if root is not None else Path.cwd()).resolve() / DEFAULT_DIR / DB_NAME
    return _SQLITE_PREFIX + db.as_posix()


def artifact_root_for(uri: str) -> str | None:
    """The artifact root that goes with an SQLite store (a folder beside the database).

    Returns None for any other store: a tracking server decides where artifacts go.
    """
    db = _sqlite_file(uri)
    return None if db is None else (db.resolve().parent / ARTIFACT_DIR).as_uri()


def init_store(uri: str | None = None, root: Path | None = None) -> str:
    """Create the SQLite store behind ``uri`` once and return the URI; idempotent.

    MLflow creates its tables on first use, which takes seconds and fails when two processes
    do it at once, so creation is serialised by a lock file beside the database. Other
    stores (a server, another database) manage their own schema and are returned as given.
    """
    uri = uri or default_uri(root)
    db = _sqlite_file(uri)
    if db is None:
        return uri
    db.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(db.with_name(db.name + ".lock")):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys; lists and tuples kept as their str()."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = str(value) if isinstance(value, list | tuple) else value
    return flat


class Tracker:
    """Logs trial results of one experiment to an MLflow store.

    Construction checks that the store is reachable, creates it if it is the embedded
    SQLite store, and gets or creates the experiment, so it happens once, before trials run.
    """

    def __init__(self, uri: str | None, experiment: str, root: Path | None = None) -> None:
        self.uri = uri or default_uri(root)
        self.experiment_name = experiment
        _check_reachable(self.uri)
        try:
            init_store(self.uri)
            self._client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._get_or_create_experiment()
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"tracking uri {self.uri}: {_one_line(exc)}") from exc

    def _get_or_create_experiment(self) -> str:
        name = self.experiment_name
        found = self._client.get_experiment_by_name(name)
        if found is None:
            try:
                return self._client.create_experiment(
                    name, artifact_location=artifact_root_for(self.uri)
                )
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # Another process created it between our lookup and our create: use theirs.
                found = self._client.get_experiment_by_name(name)
                assert found is not None  # it exists: creating it was refused for that reason
        if found.lifecycle_stage == "deleted":
            raise TrackingError(
                f"tracking uri {self.uri}: experiment {name!r} is deleted; restore it "
                "(mlflow experiments restore) or choose another experiment name"
            )
        return str(found.experiment_id)

    def log_trial(
        self,
        result: TrialResult,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Log ``result`` as one run named by its trial id and return the run id.

        Metrics go in one batch (non-finite values are skipped and named in the tag
        ``qatbench.nonfinite_metrics``); ``result.params`` and ``params`` are logged flattened
        with dotted keys; ``tags`` are added to qatbench's own, which take precedence. The
        ONNX file (``result.artifacts["onnx"]``) is logged as ``model.onnx`` and the result
        itself, with its run id, as ``trial.json``.
        """
        try:
            run_id: str = self._client.create_run(
                self.experiment_id, run_name=result.id, tags=self._tags(result, tags)
            ).info.run_id
        except MlflowException as exc:
            raise TrackingError(f"tracking uri {self.uri}: {_one_line(exc)}") from exc
        try:
            self._client.log_batch(run_id, metrics=_metrics(result), params=_params(result, params))
            if "onnx" in result.artifacts:
                self._log_onnx(run_id, Path(result.artifacts["onnx"]))
            trial = result.with_run_id(run_id).to_dict()
            self._client.log_text(run_id, json.dumps(trial, indent=2), "trial.json")
            self._client.set_terminated(run_id, "FINISHED" if result.ok else "FAILED")
        # Any backend (database, server, object store) has its own exceptions: whatever
        # breaks the logging leaves the run FAILED and surfaces as one TrackingError.
        except Exception as exc:
            with suppress(MlflowException):
                self._client.set_terminated(run_id, "FAILED")
            raise TrackingError(
                f"tracking uri {self.uri}: logging trial {result.id} failed: {_one_line(exc)}"
            ) from exc
        return run_id

    def _tags(self, result: TrialResult, extra: Mapping[str, str] | None) -> dict[str, str]:
        own = {
            "qatbench.version": _version(),
            "qatbench.status": result.status,
            "qatbench.trial_id": result.id,
            "model": result.model,
            "method": result.method,
            "bits": result.bits,
            "runtime": result.runtime,
        }
        if result.error is not None:
            own["qatbench.error"] = f"{result.error.phase}: {result.error.reason}"
        nonfinite = sorted(k for k, v in result.metrics.items() if not math.isfinite(v))
        if nonfinite:
            own["qatbench.nonfinite_metrics"] = ",".join(nonfinite)
        merged = {**(extra or {}), **own}
        return {k: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in merged.items()}

    def _log_onnx(self, run_id: str, path: Path) -> None:
        """Log the ONNX file at ``path`` under the artifact name ``model.onnx``."""
        if path.name == "model.onnx":
            self._client.log_artifact(run_id, str(path))
            return
        with tempfile.TemporaryDirectory(prefix="qatbench-onnx-") as tmp:
            renamed = Path(tmp) / "model.onnx"
            shutil.copyfile(path, renamed)
            self._client.log_artifact(run_id, str(renamed))

    def log_run(
        self,
        name: str,
        *,
        metrics: Mapping[str, float],
        tags: Mapping[str, str] | None = None,
        text_artifacts: Mapping[str, str] | None = None,
        ok: bool = True,
    ) -> str:
        """Log a run that is not a trial (e.g. ``qatbench selftest``); returns its id."""
        now_ms = int(time.time() * 1000)
        own = {"qatbench.version": _version(), **(tags or {})}
        try:
            run_id: str = self._client.create_run(
                self.experiment_id, run_name=name, tags=own
            ).info.run_id
            self._client.log_batch(
                run_id,
                metrics=[
                    Metric(k, float(v), now_ms, 0) for k, v in metrics.items() if math.isfinite(v)
                ],
            )
            for file_name, text in (text_artifacts or {}).items():
                self._client.log_text(run_id, text, file_name)
            self._client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
        except MlflowException as exc:
            raise TrackingError(f"tracking uri {self.uri}: {_one_line(exc)}") from exc
        return run_id

    def find_run(self, trial_id: str) -> str | None:
        """The id of the latest active run named ``trial_id`` in the experiment, else None."""
        try:
            runs = self._client.search_runs(
                [self.experiment_id],
                filter_string=f"attributes.run_name = '{trial_id}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        except MlflowException as exc:
            raise TrackingError(f"tracking uri {self.uri}: {_one_line(exc)}") from exc
        return runs[0].info.run_id if runs else None


def search_trials(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every active run of ``experiment`` as plain data, newest first.

    Each item holds ``run_id``, ``run_name``, ``status``, ``metrics``, ``params`` and ``tags``.
    """
    _check_reachable(uri)
    db = _sqlite_file(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"tracking uri {uri}: no such store ({db} does not exist)")
    client = MlflowClient(tracking_uri=uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise TrackingError(f"tracking uri {uri}: no experiment named {experiment!r}")
        return [_run_dict(run) for run in _all_runs(client, str(found.experiment_id))]
    except MlflowException as exc:
        raise TrackingError(f"tracking uri {uri}: {_one_line(exc)}") from exc


def _all_runs(client: MlflowClient, experiment_id: str) -> Iterator[Run]:
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _run_dict(run: Run) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "metrics": dict(run.data.metrics),
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
    }


def _metrics(result: TrialResult) -> list[Metric]:
    now_ms = int(time.time() * 1000)
    return [
        Metric(key, float(value), now_ms, 0)
        for key, value in result.metrics.items()
        if math.isfinite(value)
    ]


def _params(result: TrialResult, params: Mapping[str, Any]) -> list[Param]:
    flat = {**flatten(result.params), **flatten(params)}
    return [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flat.items()]


def _version() -> str:
    import qatbench

    version = getattr(qatbench, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("qatbench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sqlite_file(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI; None for in-memory and non-SQLite URIs."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    path = uri[len(_SQLITE_PREFIX) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _check_reachable(uri: str) -> None:
    """Fail fast on an http(s) server that does not answer, instead of MLflow's long retries.

    Any HTTP answer, even an error status, proves the server is there.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=REACHABILITY_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return
    except urllib.error.URLError as exc:
        reason = exc.reason
    except OSError as exc:  # a timeout or reset while reading the answer
        reason = exc
    raise TrackingError(f"tracking uri {uri} is not reachable: {_one_line(reason)}")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) while in the block."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _one_line(error: object) -> str:
    """The first non-empty line of an error's text (MLflow messages can span many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
