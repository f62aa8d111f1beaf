"""The :class:`Tracker`: one MLflow experiment's runs, logged per trial and found again.

A sweep's runs carry its id (tag ``qatbench.sweep``), so a resumed sweep finds the runs
an interrupted attempt logged, keeps the complete ones and deletes the rest.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from qatbench.errors import TrackingError
from qatbench.results import TrialResult
from qatbench.tracking.onnx_model import log_onnx_model
from qatbench.tracking.queries import read_trial_json
from qatbench.tracking.run_data import qatbench_version, trial_metrics, trial_params, trial_tags
from qatbench.tracking.store import (
    artifact_root_for,
    check_reachable,
    default_uri,
    init_store,
    one_line,
)

SWEEP_TAG = "qatbench.sweep"  # every run of one sweep (one report.json) carries its id
TRIAL_TAG = "qatbench.trial_id"
SWEEP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
_TERMINAL = ("FINISHED", "FAILED")


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
        check_reachable(self.uri)
        try:
            init_store(self.uri)
            self._client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._get_or_create_experiment()
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"tracking uri {self.uri}: {one_line(exc)}") from exc

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
        by the trial id (:func:`~qatbench.tracking.onnx_model.log_onnx_model`), and the result
        itself, with its run id, as ``trial.json``; the run then ends FINISHED, or FAILED for
        a failed trial (the reason is in the tag ``qatbench.error``). A run whose logging
        broke off is left without ``trial.json`` (see :meth:`recover`).
        """
        check_reachable(self.uri)  # a server that went away fails in seconds, not minutes
        own_tags = trial_tags(result, tags)
        if sweep is not None:
            own_tags[SWEEP_TAG] = _checked_sweep(sweep)
        try:
            run_id: str = self._client.create_run(
                self.experiment_id, run_name=result.id, tags=own_tags
            ).info.run_id
        # The store's own exceptions (database driver, HTTP client) are not all MlflowException.
        except Exception as exc:
            raise TrackingError(f"tracking uri {self.uri}: {one_line(exc)}") from exc
        try:
            self._client.log_batch(
                run_id, metrics=trial_metrics(result), params=trial_params(result, params)
            )
            if "onnx" in result.artifacts:
                example = result.artifacts.get("onnx_input_example")
                path = Path(result.artifacts["onnx"])
                log_onnx_model(
                    self._client, self.uri, self.experiment_id, run_id, path, example, result.id
                )
            trial = result.with_run_id(run_id).to_dict()
            self._client.log_text(run_id, json.dumps(trial, indent=2), "trial.json")
            self._client.set_terminated(run_id, "FINISHED" if result.ok else "FAILED")
        # Any backend (database, server, object store) has its own exceptions: whatever
        # breaks the logging leaves the run FAILED and surfaces as one TrackingError.
        except Exception as exc:
            with suppress(MlflowException):
                self._client.set_terminated(run_id, "FAILED")
            raise TrackingError(
                f"tracking uri {self.uri}: logging trial {result.id} failed: {one_line(exc)}"
            ) from exc
        return run_id

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
        own = {"qatbench.version": qatbench_version(), **(tags or {})}
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
            raise TrackingError(f"tracking uri {self.uri}: {one_line(exc)}") from exc
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
            raise TrackingError(f"tracking uri {self.uri}: {one_line(exc)}") from exc
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
        data = read_trial_json(self._client, run.run_id, tmp)
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
            raise TrackingError(f"tracking uri {self.uri}: {one_line(exc)}") from exc
        except Exception as exc:  # the store did not answer
            raise TrackingError(f"tracking uri {self.uri}: {one_line(exc)}") from exc
        return bool(run.info.lifecycle_stage == "active")

    def tag_picks(self, picks: tuple[dict[str, Any], ...]) -> None:
        """Tag each picked trial's run ``qatbench.pick.b{N}`` (or ``qatbench.pick``) with why
        it was picked (report.json ``picks``; qatbench/report/pick.py)."""
        try:
            for pick in picks:
                if pick.get("run_id") and pick.get("trial_id"):
                    n = pick.get("batch_size")
                    key = f"qatbench.pick.b{n}" if n else "qatbench.pick"
                    self._client.set_tag(pick["run_id"], key, str(pick.get("why", ""))[:5000])
        except Exception as exc:  # any backend's failure: an outage to report
            raise TrackingError(f"tracking uri {self.uri}: {one_line(exc)}") from exc

    def delete_run(self, run_id: str) -> None:
        """Delete a run (MLflow keeps it restorable until garbage collection)."""
        try:
            self._client.delete_run(run_id)
        except Exception as exc:  # any backend's failure: an outage to report
            raise TrackingError(f"tracking uri {self.uri}: {one_line(exc)}") from exc

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
            raise TrackingError(f"tracking uri {self.uri}: {one_line(exc)}") from exc
        return runs[0].info.run_id if runs else None


def _checked_sweep(sweep: str) -> str:
    """``sweep`` if it is a well-formed sweep id (it goes into MLflow filter strings)."""
    if not re.fullmatch(SWEEP_ID_PATTERN, sweep):
        raise TrackingError(f"sweep id {sweep!r} is malformed; allowed: {SWEEP_ID_PATTERN}")
    return sweep
