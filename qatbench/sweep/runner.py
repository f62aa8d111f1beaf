"""Start or resume a sweep: validate, create the tracking experiment once, set up the run
folder and record, and hand them to :class:`~qatbench.sweep.loop.SweepLoop`, which runs
each trial in isolation, logs it, and keeps ``report.json`` current after every trial.

The runner is the only place that knows about folders, tracking and reports; trials know
nothing of them. Results flow one way: TrialSpec -> TrialResult -> MLflow + report.

A sweep is one run folder (``reports/<experiment>/<UTC time>/``) with one ``report.json``,
and its id (``record.tracking["sweep"]``) tags every MLflow run it logs, as
``qatbench.sweep``. Per trial the runner writes ``trials/<id>/result.json``, then logs the
MLflow run, then rewrites ``report.json``, so a sweep killed at any point can be resumed
(:func:`resume_experiment`) without measuring a trial twice or logging it twice: a trial
in ``report.json`` is done; else a complete MLflow run of the sweep gives its result; else
its ``result.json`` does (it is then logged); else it runs.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from qatbench.measure.env import fingerprint
from qatbench.results import RunRecord
from qatbench.spec.schema import ExperimentSpec, TrialSpec, load_experiment
from qatbench.sweep import folders
from qatbench.sweep.executor import Executor
from qatbench.sweep.loop import SweepLoop
from qatbench.sweep.outcome import RunOutcome

if TYPE_CHECKING:
    from qatbench.tracking.tracker import Tracker


def run_experiment(
    path: Path,
    *,
    tracking_uri: str | None = None,
    output_root: Path = Path("reports"),
    console: Console | None = None,
    select: Callable[[TrialSpec], bool] | None = None,
    executor: Executor | None = None,
    shard: folders.Shard | None = None,
    sweep_id: str | None = None,
    run_key: str | None = None,
) -> RunOutcome:
    """Run every trial of the experiment file at ``path`` (of its ``shard`` of the grid, if
    given; the report names it) as a new sweep; see RunOutcome.

    The sweep's MLflow id is ``sweep_id`` if given, else ``<experiment>-<run_key>`` with a
    ``run_key``, else a new one: shards run with the same id (or key) log one sweep, which
    ``compare``, ``history`` and ``--baseline previous`` see whole."""
    from qatbench.tracking.tracker import Tracker  # the only package importing mlflow

    spec = load_experiment(path)
    given_id = folders.sweep_id(spec.name, sweep_id, run_key)  # checked before anything is made
    tracker = Tracker(tracking_uri or spec.tracking.uri, spec.tracking.experiment or spec.name)
    created = dt.datetime.now(dt.UTC)
    run_dir = folders.new_run_dir(output_root, spec.name, created)
    experiment = {"name": spec.name, "source": str(path), "spec": spec.model_dump(mode="json")}
    if shard is not None:
        experiment["shard"] = str(shard)
    record = RunRecord(
        experiment=experiment,
        created=created.isoformat(timespec="seconds"),
        env=fingerprint(threads=spec.measure.threads),
        tracking={
            "uri": tracker.uri,
            "experiment_id": tracker.experiment_id,
            "experiment": tracker.experiment_name,
            "sweep": given_id or new_sweep_id(created),
        },
    )
    select = _in_shard(spec, shard, select)
    sweep = SweepLoop(spec, record, run_dir, tracker, console, executor, select, known_runs={})
    return sweep.run()


def resume_experiment(
    report: Path,
    *,
    tracking_uri: str | None = None,
    console: Console | None = None,
    select: Callable[[TrialSpec], bool] | None = None,
    executor: Executor | None = None,
) -> RunOutcome:
    """Continue the sweep of ``report`` (a report.json or its run folder).

    The experiment is the one stored in the report, so the grid and settings are those the
    sweep started with. Trials in the report are kept as they are; each missing trial is
    recovered from the sweep's MLflow runs or its ``result.json`` if it got that far, and
    run otherwise. The MLflow store is the report's unless ``tracking_uri`` is given. A
    sweep of one shard of the grid continues that shard only.
    """
    from qatbench.tracking.tracker import Tracker

    json_path = folders.report_path(report)
    record = RunRecord.load(json_path)
    spec = folders.stored_spec(record, json_path)
    uri = tracking_uri or record.tracking.get("uri") or spec.tracking.uri
    name = record.tracking.get("experiment") or spec.tracking.experiment or spec.name
    tracker = Tracker(uri, str(name))
    record = logged_to(record, tracker)
    sweep_id = str(record.tracking["sweep"])
    known = tracker.sweep_runs(sweep_id)
    shard = record.experiment.get("shard")
    select = _in_shard(spec, folders.Shard.parse(str(shard)) if shard else None, select)
    sweep = SweepLoop(spec, record, json_path.parent, tracker, console, executor, select, known)
    return sweep.run()


def _in_shard(
    spec: ExperimentSpec,
    shard: folders.Shard | None,
    select: Callable[[TrialSpec], bool] | None,
) -> Callable[[TrialSpec], bool] | None:
    """``select`` narrowed to the trials of ``shard`` (unchanged without a shard)."""
    if shard is None:
        return select
    ids = shard.ids(spec)
    return lambda t: t.id in ids and (select is None or select(t))


def logged_to(record: RunRecord, tracker: Tracker) -> RunRecord:
    """The record pointed at ``tracker``'s store and experiment, keeping its sweep id (a
    new one when it has none): what a resume or a sync logs the sweep's trials to."""
    sweep = str(record.tracking.get("sweep") or new_sweep_id(dt.datetime.now(dt.UTC)))
    return replace(
        record,
        tracking={
            **record.tracking,
            "uri": tracker.uri,
            "experiment_id": tracker.experiment_id,
            "experiment": tracker.experiment_name,
            "sweep": sweep,
        },
    )


def new_sweep_id(created: dt.datetime) -> str:
    """A sweep id: its UTC start time (so ids sort by time) and 32 random bits, so sweeps
    started in the same second on several machines against one store never collide."""
    return f"{created.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
