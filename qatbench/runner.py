"""Drive a sweep: validate, create the tracking experiment once, run each trial in isolation,
log it, and keep ``report.json`` current after every trial.

The runner is the only place that knows about folders, tracking and reports; trials know
nothing of them. Results flow one way: TrialSpec -> TrialResult -> MLflow + report.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from qatbench.errors import QatbenchError
from qatbench.executor import LocalProcessExecutor
from qatbench.measure.env import fingerprint
from qatbench.report.html import write_html
from qatbench.results import RunRecord, TrialResult
from qatbench.spec import ExperimentSpec, TrialSpec, load_experiment

if TYPE_CHECKING:
    from qatbench.tracking import Tracker


@dataclass
class RunOutcome:
    """What a finished (or interrupted) run leaves behind."""

    record: RunRecord
    report_json: Path
    report_html: Path
    breaches: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[TrialResult]:
        return [t for t in self.record.trials if not t.ok]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.breaches else 0


def run_experiment(
    path: Path,
    *,
    tracking_uri: str | None = None,
    output_root: Path = Path("reports"),
    console: Console | None = None,
    select: Callable[[TrialSpec], bool] | None = None,
) -> RunOutcome:
    """Run every trial of the experiment file at ``path``; see :class:`RunOutcome`."""
    from qatbench.tracking import Tracker  # the only module importing mlflow

    console = console or Console(stderr=True)
    spec = load_experiment(path)
    trials = [t for t in spec.expand() if select is None or select(t)]
    uri = tracking_uri or spec.tracking.uri
    tracker = Tracker(uri, spec.tracking.experiment or spec.name)
    created = dt.datetime.now(dt.UTC)
    run_dir = output_root / spec.name / created.strftime("%Y%m%dT%H%M%SZ")
    record = RunRecord(
        experiment={"name": spec.name, "source": str(path), "spec": spec.model_dump(mode="json")},
        created=created.isoformat(timespec="seconds"),
        env=fingerprint(threads=spec.measure.threads),
        tracking={
            "uri": tracker.uri,
            "experiment_id": tracker.experiment_id,
            "experiment": tracker.experiment_name,
        },
    )
    json_path, html_path = run_dir / "report.json", run_dir / "report.html"
    record.save(json_path)
    executor = LocalProcessExecutor()
    tags = _env_tags(record.env)
    try:
        with _progress(console, len(trials)) as advance:
            for trial in trials:
                advance(trial.id, False)
                result = executor.run(trial, run_dir / "trials" / trial.id, trial.timeout_s)
                result = result.with_run_id(_log(tracker, result, tags, console))
                record = record.with_trial(result)
                record.save(json_path)
                advance(trial.id, True)
                if not result.ok and result.error:
                    console.print(
                        f"[red]failed[/] {trial.id}: {result.error.phase}: {result.error.reason}"
                    )
    finally:
        executor.stop()
        record.save(json_path)
        write_html(record, html_path)
    breaches = check_expectations(spec, record)
    return RunOutcome(record, json_path, html_path, breaches)


def check_expectations(spec: ExperimentSpec, record: RunRecord) -> list[str]:
    """One line per breached expectation, for every finished trial of ``spec``."""
    by_id = {t.id: t for t in record.trials}
    lines = []
    for trial in spec.expand():
        result = by_id.get(trial.id)
        if result is None or not result.ok:
            continue
        for expectation in trial.expectations():
            breach = expectation.check(result.metrics, trial.id)
            if breach:
                lines.append(breach)
    return lines


def _log(
    tracker: Tracker, result: TrialResult, tags: dict[str, str], console: Console
) -> str | None:
    try:
        return tracker.log_trial(result, params=result.params, tags=tags)
    except QatbenchError as exc:
        console.print(f"[yellow]warning[/] {result.id}: not logged to MLflow: {exc}")
        warnings.warn(f"{result.id}: not logged to MLflow: {exc}", stacklevel=2)
        return None


def _env_tags(env: dict[str, object]) -> dict[str, str]:
    tags = {f"env.{k}": str(v) for k, v in env.items() if not isinstance(v, dict | list)}
    if env.get("git_commit"):
        tags["mlflow.source.git.commit"] = str(env["git_commit"])
    return tags


@contextmanager
def _progress(console: Console, total: int) -> Iterator[Callable[[str, bool], None]]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=total)

        def advance(trial_id: str, done: bool) -> None:
            progress.update(task, description=trial_id, advance=1 if done else 0)

        yield advance
