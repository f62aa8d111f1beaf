"""``qatbench sync``: push the trials of a report that are missing from MLflow; idempotent."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from qatbench.errors import ConfigError
from qatbench.report.html import write_html
from qatbench.results import RunRecord
from qatbench.sweep import folders
from qatbench.sweep.runner import logged_to
from qatbench.tracking.tags import env_tags, trial_env_tags


def sync_report(
    report: Path, *, tracking_uri: str | None = None, console: Console | None = None
) -> tuple[int, int]:
    """Push the trials of ``report`` that are not in the MLflow store; idempotent.

    A trial is pushed when it has no run id or its run id is not an active run of the
    store. A complete run of the same sweep and trial (logged before report.json was
    updated) is adopted instead of logged again, and incomplete ones are deleted, so
    running it twice logs nothing the second time. report.json is rewritten atomically
    after each trial, report.html at the end. Returns (pushed, already there).
    """
    from qatbench.tracking.tracker import Tracker

    console = console or Console(stderr=True)
    json_path = folders.report_path(report)
    record = RunRecord.load(json_path)
    name = record.tracking.get("experiment") or record.experiment.get("name")
    if not name:
        raise ConfigError(f"{json_path}: the report names no experiment to log to")
    tracker = Tracker(tracking_uri or record.tracking.get("uri"), str(name))
    record = logged_to(record, tracker)
    sweep = str(record.tracking["sweep"])
    with folders.locked(json_path.parent):
        record.save(json_path)
        known = tracker.sweep_runs(sweep)
        tags = env_tags(record.env)
        pushed = present = 0
        for result in record.trials:
            if result.mlflow_run_id and tracker.has_run(result.mlflow_run_id):
                present += 1
                continue
            runs = known.get(result.id, [])
            recovered = tracker.recover(runs) if runs else None
            if recovered is not None:
                run_id = recovered.mlflow_run_id
                console.print(f"{result.id}: already in MLflow as run {run_id}")
            else:
                run_id = tracker.log_trial(
                    result, params=result.params, tags=trial_env_tags(tags, result), sweep=sweep
                )
                console.print(f"{result.id}: logged as run {run_id}")
            record = record.with_trial(result.with_run_id(run_id))
            record.save(json_path)
            pushed += 1
        if json_path.with_name("report.html").exists() or pushed:
            write_html(record, json_path.with_name("report.html"))
    return pushed, present
