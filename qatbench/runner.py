"""Drive a sweep: validate, create the tracking experiment once, run each trial in isolation,
log it, and keep ``report.json`` current after every trial.

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
import json
import secrets
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from qatbench import sweeps
from qatbench.errors import ConfigError, QatbenchError
from qatbench.executor import Executor, Job, LocalProcessExecutor, results_as_completed
from qatbench.measure.env import fingerprint
from qatbench.report.html import write_html
from qatbench.results import RunRecord, TrialResult, write_text_atomic
from qatbench.spec import ExperimentSpec, TrialSpec, load_experiment

if TYPE_CHECKING:
    from qatbench.tracking.tracker import SweepRun, Tracker

RESULT_FILE = "result.json"  # trials/<id>/result.json: the result before it is logged
INTERRUPT_EXIT = {"SIGINT": 130, "SIGTERM": 143}


@dataclass
class RunOutcome:
    """What a finished (or interrupted) run leaves behind."""

    record: RunRecord
    report_json: Path
    report_html: Path
    breaches: list[str] = field(default_factory=list)
    interrupted: str | None = None  # the signal that stopped the sweep: SIGINT or SIGTERM
    missing: list[str] = field(default_factory=list)  # trial ids of the grid not in the record

    @property
    def failed(self) -> list[TrialResult]:
        return [t for t in self.record.trials if not t.ok]

    @property
    def unlogged(self) -> list[str]:
        """Trials kept in report.json but not in MLflow (``qatbench sync`` pushes them)."""
        return [t.id for t in self.record.trials if t.mlflow_run_id is None]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return INTERRUPT_EXIT.get(self.interrupted, 130)
        return 1 if self.failed or self.breaches else 0


def run_experiment(
    path: Path,
    *,
    tracking_uri: str | None = None,
    output_root: Path = Path("reports"),
    console: Console | None = None,
    select: Callable[[TrialSpec], bool] | None = None,
    executor: Executor | None = None,
    shard: sweeps.Shard | None = None,
) -> RunOutcome:
    """Run every trial of the experiment file at ``path`` (of its ``shard`` of the grid, if
    given; the report names it) as a new sweep; see RunOutcome."""
    from qatbench.tracking.tracker import Tracker  # the only module importing mlflow

    spec = load_experiment(path)
    tracker = Tracker(tracking_uri or spec.tracking.uri, spec.tracking.experiment or spec.name)
    created = dt.datetime.now(dt.UTC)
    run_dir = sweeps.new_run_dir(output_root, spec.name, created)
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
            "sweep": new_sweep_id(created),
        },
    )
    select = _in_shard(spec, shard, select)
    sweep = _Sweep(spec, record, run_dir, tracker, console, executor, select, known_runs={})
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

    json_path = sweeps.report_path(report)
    record = RunRecord.load(json_path)
    spec = sweeps.stored_spec(record, json_path)
    uri = tracking_uri or record.tracking.get("uri") or spec.tracking.uri
    name = record.tracking.get("experiment") or spec.tracking.experiment or spec.name
    tracker = Tracker(uri, str(name))
    sweep_id = str(record.tracking.get("sweep") or new_sweep_id(dt.datetime.now(dt.UTC)))
    record = replace(
        record,
        tracking={
            **record.tracking,
            "uri": tracker.uri,
            "experiment_id": tracker.experiment_id,
            "experiment": tracker.experiment_name,
            "sweep": sweep_id,
        },
    )
    known = tracker.sweep_runs(sweep_id)
    shard = record.experiment.get("shard")
    select = _in_shard(spec, sweeps.Shard.parse(str(shard)) if shard else None, select)
    sweep = _Sweep(spec, record, json_path.parent, tracker, console, executor, select, known)
    return sweep.run()


def _in_shard(
    spec: ExperimentSpec,
    shard: sweeps.Shard | None,
    select: Callable[[TrialSpec], bool] | None,
) -> Callable[[TrialSpec], bool] | None:
    """``select`` narrowed to the trials of ``shard`` (unchanged without a shard)."""
    if shard is None:
        return select
    ids = shard.ids(spec)
    return lambda t: t.id in ids and (select is None or select(t))


def new_sweep_id(created: dt.datetime) -> str:
    """A sweep id: its UTC start time (so ids sort by time) and 32 random bits, so sweeps
    started in the same second on several machines against one store never collide."""
    return f"{created.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


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


class _Sweep:
    """One sweep being run or resumed: its folder, record, store and worker executor."""

    def __init__(
        self,
        spec: ExperimentSpec,
        record: RunRecord,
        run_dir: Path,
        tracker: Tracker,
        console: Console | None,
        executor: Executor | None,
        select: Callable[[TrialSpec], bool] | None,
        known_runs: dict[str, list[SweepRun]],
    ) -> None:
        self.spec, self.record, self.run_dir, self.tracker = spec, record, run_dir, tracker
        self.console = console or Console(stderr=True)
        self.executor = executor or LocalProcessExecutor()
        self.trials = [t for t in spec.expand() if select is None or select(t)]
        self.known_runs = known_runs
        self.sweep = str(record.tracking["sweep"])
        self.tags = _env_tags(record.env)
        self.json_path = run_dir / "report.json"
        self.html_path = run_dir / "report.html"

    def run(self) -> RunOutcome:
        interrupted: str | None = None
        with sweeps.locked(self.run_dir):
            self.record.save(self.json_path)
            done = {t.id for t in self.record.trials}
            todo = [t for t in self.trials if t.id not in done]
            try:
                with _signals_interrupt(), self._progress(len(todo)) as advance:
                    jobs = []
                    for trial in todo:  # what an interrupted attempt got to, then the rest
                        recovered = self._recover(trial)
                        if recovered is None:
                            jobs.append(self._job(trial))
                        else:
                            self._record(recovered, advance)

                    def started(job: Job) -> None:
                        advance(job.trial.id, False)

                    for job, result in results_as_completed(self.executor, jobs, started):
                        write_text_atomic(
                            job.out_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2)
                        )
                        self._record(result.with_run_id(self._log(result)), advance)
                    self._log_unlogged(done)
            except KeyboardInterrupt as exc:
                interrupted = getattr(exc, "signal_name", "SIGINT")
            finally:
                with _shielded():  # a second Ctrl-C must not cut the report short
                    self.executor.stop()
                    self.record.save(self.json_path)
                    write_html(self.record, self.html_path)
        recorded = {t.id for t in self.record.trials}
        outcome = RunOutcome(
            self.record,
            self.json_path,
            self.html_path,
            breaches=check_expectations(self.spec, self.record),
            interrupted=interrupted,
            missing=[t.id for t in self.trials if t.id not in recorded],
        )
        if outcome.unlogged and not interrupted:
            warnings.warn(
                f"{len(outcome.unlogged)} trial(s) are in {self.json_path} but not in MLflow; "
                f"push them with: qatbench sync {self.json_path}",
                stacklevel=2,
            )
        return outcome

    def _record(self, result: TrialResult, advance: Callable[[str, bool], None]) -> None:
        """Add a logged result to report.json, advance the bar, name a failure."""
        self.record = self.record.with_trial(result)
        self.record.save(self.json_path)
        advance(result.id, True)
        if not result.ok and result.error:
            self.console.print(
                f"[red]failed[/] {escape(result.id)}: "
                f"{escape(result.error.phase)}: {escape(result.error.reason)}",
                highlight=False,
                soft_wrap=True,
            )

    def _recover(self, trial: TrialSpec) -> TrialResult | None:
        """The trial's result if an interrupted attempt got it: from a complete MLflow run
        of the sweep, else from its result.json (then logged now); None if it must run."""
        runs = self.known_runs.get(trial.id)
        if runs:
            recovered = self.tracker.recover(runs)
            if recovered is not None:
                self.console.print(
                    f"recovered {trial.id} from MLflow run {recovered.mlflow_run_id}",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
                return recovered
        result = _read_result(sweeps.trial_dir(self.run_dir, trial.id) / RESULT_FILE, trial.id)
        return None if result is None else result.with_run_id(self._log(result))

    def _job(self, trial: TrialSpec) -> Job:
        """A job for ``trial`` with a clean artifact folder."""
        out_dir = sweeps.trial_dir(self.run_dir, trial.id)
        if out_dir.exists():  # what an interrupted attempt left: never mixed with this one
            shutil.rmtree(out_dir)
        return Job(trial, out_dir, trial.timeout_s)

    def _log_unlogged(self, skip: set[str]) -> None:
        """Log trials the record kept without a run id (an outage before a resume)."""
        for result in self.record.trials:
            if result.mlflow_run_id is None and result.id in skip:
                runs = self.known_runs.get(result.id, [])
                recovered = self.tracker.recover(runs) if runs else None
                run_id = recovered.mlflow_run_id if recovered else self._log(result)
                if run_id is not None:
                    self.record = self.record.with_trial(result.with_run_id(run_id))
                    self.record.save(self.json_path)

    def _log(self, result: TrialResult) -> str | None:
        try:
            return self.tracker.log_trial(
                result, params=result.params, tags=_trial_tags(self.tags, result), sweep=self.sweep
            )
        except QatbenchError as exc:
            self.console.print(
                f"[yellow]warning[/] {escape(result.id)}: not logged to MLflow: {escape(str(exc))}",
                highlight=False,
                soft_wrap=True,
            )
            return None

    @contextmanager
    def _progress(self, total: int) -> Iterator[Callable[[str, bool], None]]:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task("starting", total=total)

            def advance(trial_id: str, done: bool) -> None:
                progress.update(task, description=trial_id, advance=1 if done else 0)

            yield advance


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
    json_path = sweeps.report_path(report)
    record = RunRecord.load(json_path)
    name = record.tracking.get("experiment") or record.experiment.get("name")
    if not name:
        raise ConfigError(f"{json_path}: the report names no experiment to log to")
    tracker = Tracker(tracking_uri or record.tracking.get("uri"), str(name))
    sweep = str(record.tracking.get("sweep") or new_sweep_id(dt.datetime.now(dt.UTC)))
    record = replace(
        record,
        tracking={
            **record.tracking,
            "uri": tracker.uri,
            "experiment_id": tracker.experiment_id,
            "experiment": tracker.experiment_name,
            "sweep": sweep,
        },
    )
    with sweeps.locked(json_path.parent):
        record.save(json_path)
        known = tracker.sweep_runs(sweep)
        tags = _env_tags(record.env)
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
                    result, params=result.params, tags=_trial_tags(tags, result), sweep=sweep
                )
                console.print(f"{result.id}: logged as run {run_id}")
            record = record.with_trial(result.with_run_id(run_id))
            record.save(json_path)
            pushed += 1
        if json_path.with_name("report.html").exists() or pushed:
            write_html(record, json_path.with_name("report.html"))
    return pushed, present


def _read_result(path: Path, trial_id: str) -> TrialResult | None:
    """The result.json an interrupted sweep left for ``trial_id``; None if absent or torn."""
    try:
        result = TrialResult.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return result if result.id == trial_id else None


def _env_tags(env: dict[str, object]) -> dict[str, str]:
    tags = {f"env.{k}": str(v) for k, v in env.items() if not isinstance(v, dict | list)}
    if env.get("git_commit"):
        tags["mlflow.source.git.commit"] = str(env["git_commit"])
    return tags


def _trial_tags(tags: dict[str, str], result: TrialResult) -> dict[str, str]:
    """The sweep's env tags, overridden by the machine that ran the trial where it says
    (on a cluster, the node; see :func:`qatbench.executor.with_node_env`)."""
    node = result.details.get("env")
    return {**tags, **_env_tags(node)} if isinstance(node, dict) else tags


class _Stopped(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (workers killed, partial report kept)."""

    signal_name = "SIGTERM"


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM into an interruption while a sweep runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum: int, _frame: FrameType | None) -> Any:
        raise _Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _shielded() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while the partial report is written (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
