"""Logged trials read back from an existing store, for ``compare``, ``history`` and ``report``.

Reading never creates a store: a missing SQLite database or experiment is a
:class:`~qatbench.errors.TrackingError`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from qatbench.errors import TrackingError
from qatbench.tracking.store import check_reachable, no_progress_bars, one_line, store_client


def search_trials(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every active run of ``experiment`` as plain data, newest first.

    Each item holds ``run_id``, ``run_name``, ``status``, ``metrics``, ``params`` and ``tags``.
    """
    client = store_client(uri)
    try:
        found = _existing_experiment(client, uri, experiment)
        return [_run_dict(run) for run in _all_runs(client, str(found.experiment_id))]
    except MlflowException as exc:
        raise TrackingError(f"tracking uri {uri}: {one_line(exc)}") from exc


def fetch_trial_runs(
    uri: str, experiment: str, *, with_results: bool = True
) -> tuple[str, list[dict[str, Any]]]:
    """The id of ``experiment`` and every active run of it that logged a trial, oldest first.

    For ``qatbench compare``, ``history`` and ``report`` on an MLflow experiment. Each run is
    a :func:`search_trials` item plus ``start_time`` (ms since the epoch) and ``trial``: its
    ``trial.json`` parsed (a :class:`~qatbench.results.TrialResult` dict) when
    ``with_results``, else None; None too when that artifact is missing or unreadable.
    """
    client = store_client(uri)
    try:
        found = _existing_experiment(client, uri, experiment)
        runs = [r for r in _all_runs(client, str(found.experiment_id)) if _is_trial(r)]
        runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
        with no_progress_bars(), tempfile.TemporaryDirectory(prefix="qatbench-trials-") as tmp:
            items = [
                {
                    **_run_dict(run),
                    "start_time": run.info.start_time,
                    "trial": read_trial_json(client, run.info.run_id, Path(tmp))
                    if with_results
                    else None,
                }
                for run in runs
            ]
        return str(found.experiment_id), items
    except MlflowException as exc:
        raise TrackingError(f"tracking uri {uri}: {one_line(exc)}") from exc


def fetch_trial_results(uri: str, run_ids: list[str]) -> dict[str, dict[str, Any] | None]:
    """The parsed ``trial.json`` of each run in ``run_ids`` (None where missing or unreadable).

    For ``qatbench compare``/``report`` on one sweep: fetch the runs without results with
    :func:`fetch_trial_runs`, pick the sweep, then download only its artifacts.
    """
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    with no_progress_bars(), tempfile.TemporaryDirectory(prefix="qatbench-trials-") as tmp:
        return {run_id: read_trial_json(client, run_id, Path(tmp)) for run_id in run_ids}


def read_trial_json(client: MlflowClient, run_id: str, tmp: Path) -> dict[str, Any] | None:
    """The parsed ``trial.json`` artifact of a run; None when it is missing or not JSON."""
    dst = tmp / run_id
    try:
        dst.mkdir()
        local = client.download_artifacts(run_id, "trial.json", str(dst))
        data = json.loads(Path(local).read_text())
    except (MlflowException, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _existing_experiment(client: MlflowClient, uri: str, experiment: str) -> Any:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TrackingError(f"tracking uri {uri}: no experiment named {experiment!r}")
    return found


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


def _is_trial(run: Run) -> bool:
    return "qatbench.trial_id" in run.data.tags
