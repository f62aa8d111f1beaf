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
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
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
SWEEP_TAG = "qatbench.sweep"  # every run of one sweep (one report.json) carries its id
TRIAL_TAG = "qatbench.trial_id"
ONNX_MODEL_NAME = "onnx_model"  # the logged ONNX-flavour model of a trial's run
SWEEP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
_SQLITE_PREFIX = "sqlite:///"
_TERMINAL = ("FINISHED", "FAILED")


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


@dataclass(frozen=True)
class SweepRun:
    """An MLflow run that logged (or began to log) one trial of a sweep."""

    run_id: str
    trial_id: str
    status: str  # RUNNING while logging, FINISHED or FAILED once it completed
    start_time: int  # ms since the epoch


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
                    name,
                    artifact_location=artifact_root_for(self.uri),
                    # Opens the runs table in MLflow 3's UI rather than its GenAI overview.
                    tags={"mlflow.experimentKind": "custom_model_development"},
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
        sweep: str | None = None,
    ) -> str:
        """Log ``result`` as one run named by its trial id and return the run id.

        Metrics go in one batch (non-finite values are skipped and named in the tag
        ``qatbench.nonfinite_metrics``); ``result.params`` and ``params`` are logged flattened
        with dotted keys; ``tags`` are added to qatbench's own, which take precedence;
        ``sweep`` becomes the tag ``qatbench.sweep``. The ONNX file
        (``result.artifacts["onnx"]``) is logged once, as an MLflow ONNX-flavour model named
        ``onnx_model`` (:meth:`_log_onnx`), and the result itself, with
        its run id, as ``trial.json``; the run then ends FINISHED, or FAILED for a failed
        trial (the reason is in the tag ``qatbench.error``). A run whose logging broke off
        is left without ``trial.json`` (see :meth:`recover`).
        """
        _check_reachable(self.uri)  # a server that went away fails in seconds, not minutes
        own_tags = self._tags(result, tags)
        if sweep is not None:
            own_tags[SWEEP_TAG] = _checked_sweep(sweep)
        try:
            run_id: str = self._client.create_run(
                self.experiment_id, run_name=result.id, tags=own_tags
            ).info.run_id
        # The store's own exceptions (database driver, HTTP client) are not all MlflowException.
        except Exception as exc:
            raise TrackingError(f"tracking uri {self.uri}: {_one_line(exc)}") from exc
        try:
            self._client.log_batch(run_id, metrics=_metrics(result), params=_params(result, params))
            if "onnx" in result.artifacts:
                example = result.artifacts.get("onnx_input_example")
                self._log_onnx(run_id, Path(result.artifacts["onnx"]), example)
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

    def _log_onnx(self, run_id: str, path: Path, example: str | None = None) -> None:
        """Log the ONNX graph at ``path`` with MLflow's ONNX flavour as ``onnx_model`` of the
        run: loadable with ``mlflow.onnx.load_model`` or ``mlflow.pyfunc.load_model``
        (``runs:/<run id>/onnx_model``), with a signature read from the graph (a dynamic
        dimension is -1) and, when the worker saved one (``example``, a ``.npy`` file), an
        input example. The graph is stored once, in the logged model (``model.onnx``)."""
        import mlflow.onnx  # heavy: only runs that have a graph pay for it
        import numpy as np
        import onnx
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        model = onnx.load(str(path))
        input_example = np.load(example) if example and Path(example).is_file() else None
        # The logged model is created here, in this tracker's experiment (log_model alone
        # would put it in the fluent API's active experiment); log_model, which works on
        # the fluent client, is pointed at this store for the call only. Explicit
        # requirements skip MLflow's dependency inference (a subprocess).
        logged = self._client.create_logged_model(
            self.experiment_id, name=ONNX_MODEL_NAME, source_run_id=run_id
        )
        with _use_tracking_uri(self.uri), _no_progress_bars():
            mlflow.onnx.log_model(
                model,
                name=ONNX_MODEL_NAME,
                input_example=input_example,
                signature=_onnx_signature(model),
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                onnx_execution_providers=["CPUExecutionProvider"],  # what qatbench measured
                model_id=logged.model_id,
                run_id=run_id,
            )

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

    def sweep_runs(self, sweep: str) -> dict[str, list[SweepRun]]:
        """Every active run tagged with ``sweep``, by trial id, newest first."""
        query = f"tags.`{SWEEP_TAG}` = '{_checked_sweep(sweep)}'"
        found: dict[str, list[SweepRun]] = {}
        token: str | None = None
        try:
            while True:
                page = self._client.search_runs(
                    [self.experiment_id], filter_string=query, max_results=1000, page_token=token
                )
                for run in page:
                    trial_id = run.data.tags.get(TRIAL_TAG)
                    if trial_id:
                        found.setdefault(trial_id, []).append(
                            SweepRun(
                                run.info.run_id, trial_id, run.info.status, run.info.start_time or 0
                            )
                        )
                token = page.token
                if not token:
                    break
        except Exception as exc:  # any backend's failure to answer is an outage to report
            raise TrackingError(f"tracking uri {self.uri}: {_one_line(exc)}") from exc
        for runs in found.values():
            runs.sort(key=lambda r: (r.start_time, r.run_id), reverse=True)
        return found

    def recover(self, runs: list[SweepRun]) -> TrialResult | None:
        """The result a complete run among ``runs`` (one trial's runs of a sweep) logged.

        A run is complete when it ended (FINISHED or FAILED) with its ``trial.json``; the
        newest complete one wins and carries its run id. Incomplete runs (logging broke
        off, or the process died mid-way) are deleted, so that the trial is logged again
        exactly once. Returns None when no run is complete.
        """
        recovered: TrialResult | None = None
        with tempfile.TemporaryDirectory(prefix="qatbench-recover-") as tmp:
            for run in runs:
                result = self._logged_result(run, Path(tmp))
                if result is None:
                    self.delete_run(run.run_id)
                elif recovered is None:
                    recovered = result
                # an older complete duplicate is left alone: deleting measured data is not ours
        return recovered

    def _logged_result(self, run: SweepRun, tmp: Path) -> TrialResult | None:
        if run.status not in _TERMINAL:
            return None
        data = _trial_json(self._client, run.run_id, tmp)
        if data is None:
            return None
        try:
            return TrialResult.from_dict(data).with_run_id(run.run_id)
        except (KeyError, TypeError, ValueError, AttributeError):  # not one this version reads
            return None

    def has_run(self, run_id: str) -> bool:
        """Whether an active run ``run_id`` exists in this store."""
        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return False
            raise TrackingError(f"tracking uri {self.uri}: {_one_line(exc)}") from exc
        except Exception as exc:  # the store did not answer
            raise TrackingError(f"tracking uri {self.uri}: {_one_line(exc)}") from exc
        return bool(run.info.lifecycle_stage == "active")

    def delete_run(self, run_id: str) -> None:
        """Delete a run (MLflow keeps it restorable until garbage collection)."""
        try:
            self._client.delete_run(run_id)
        except Exception as exc:  # any backend's failure: an outage to report
            raise TrackingError(f"tracking uri {self.uri}: {_one_line(exc)}") from exc

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


def _checked_sweep(sweep: str) -> str:
    """``sweep`` if it is a well-formed sweep id (it goes into MLflow filter strings)."""
    if not re.fullmatch(SWEEP_ID_PATTERN, sweep):
        raise TrackingError(f"sweep id {sweep!r} is malformed; allowed: {SWEEP_ID_PATTERN}")
    return sweep


def _store_client(uri: str) -> MlflowClient:
    """A client on an existing store: never creates an empty SQLite database."""
    _check_reachable(uri)
    db = _sqlite_file(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"tracking uri {uri}: no such store ({db} does not exist)")
    return MlflowClient(tracking_uri=uri)


def _existing_experiment(client: MlflowClient, uri: str, experiment: str) -> Any:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TrackingError(f"tracking uri {uri}: no experiment named {experiment!r}")
    return found


def search_trials(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every active run of ``experiment`` as plain data, newest first.

    Each item holds ``run_id``, ``run_name``, ``status``, ``metrics``, ``params`` and ``tags``.
    """
    client = _store_client(uri)
    try:
        found = _existing_experiment(client, uri, experiment)
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


def _onnx_signature(model: Any) -> Any:
    """An MLflow tensor signature of the graph's inputs and outputs (symbolic dims -1)."""
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    def specs(values: Any) -> Schema:
        out: list[ColSpec | TensorSpec] = []
        for value in values:
            tensor = value.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
            out.append(TensorSpec(dtype, shape, value.name))
        return Schema(out)

    return ModelSignature(inputs=specs(model.graph.input), outputs=specs(model.graph.output))


def _one_line(error: object) -> str:
    """The first non-empty line of an error's text (MLflow messages can span many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def fetch_trial_runs(
    uri: str, experiment: str, *, with_results: bool = True
) -> tuple[str, list[dict[str, Any]]]:
    """The id of ``experiment`` and every active run of it that logged a trial, oldest first.

    For ``qatbench compare``, ``history`` and ``report`` on an MLflow experiment. Each run is
    a :func:`search_trials` item plus ``start_time`` (ms since the epoch) and ``trial``: its
    ``trial.json`` parsed (a :class:`~qatbench.results.TrialResult` dict) when
    ``with_results``, else None; None too when that artifact is missing or unreadable.
    """
    client = _store_client(uri)
    try:
        found = _existing_experiment(client, uri, experiment)
        runs = [r for r in _all_runs(client, str(found.experiment_id)) if _is_trial(r)]
        runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
        with _no_progress_bars(), tempfile.TemporaryDirectory(prefix="qatbench-trials-") as tmp:
            items = [
                {
                    **_run_dict(run),
                    "start_time": run.info.start_time,
                    "trial": _trial_json(client, run.info.run_id, Path(tmp))
                    if with_results
                    else None,
                }
                for run in runs
            ]
        return str(found.experiment_id), items
    except MlflowException as exc:
        raise TrackingError(f"tracking uri {uri}: {_one_line(exc)}") from exc


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence MLflow's per-download progress bar on stderr while in the block."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _is_trial(run: Run) -> bool:
    return "qatbench.trial_id" in run.data.tags


def _trial_json(client: MlflowClient, run_id: str, tmp: Path) -> dict[str, Any] | None:
    """The parsed ``trial.json`` artifact of a run; None when it is missing or not JSON."""
    dst = tmp / run_id
    try:
        dst.mkdir()
        local = client.download_artifacts(run_id, "trial.json", str(dst))
        data = json.loads(Path(local).read_text())
    except (MlflowException, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fetch_trial_results(uri: str, run_ids: list[str]) -> dict[str, dict[str, Any] | None]:
    """The parsed ``trial.json`` of each run in ``run_ids`` (None where missing or unreadable).

    For ``qatbench compare``/``report`` on one sweep: fetch the runs without results with
    :func:`fetch_trial_runs`, pick the sweep, then download only its artifacts.
    """
    _check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    with _no_progress_bars(), tempfile.TemporaryDirectory(prefix="qatbench-trials-") as tmp:
        return {run_id: _trial_json(client, run_id, Path(tmp)) for run_id in run_ids}
