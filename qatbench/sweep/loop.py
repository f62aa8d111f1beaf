"""The loop of one sweep being run or resumed: recover what an interrupted attempt got,
run the rest through the executor, log each result and keep ``report.json`` current.

Per trial it writes ``trials/<id>/result.json``, then logs the MLflow run, then rewrites
``report.json``, so a sweep killed at any point can be resumed without measuring a trial
twice or logging it twice. With ``measure.passes`` > 1 a trial's passes run pass-major and
its result is pooled (:mod:`qatbench.measure.passes`) before any of that; a trial whose
passes were cut short runs all of them again on resume.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from qatbench.errors import QatbenchError
from qatbench.measure.passes import pass_specs, pool
from qatbench.report.html import write_html
from qatbench.report.pick import with_picks
from qatbench.report.summary import baseline_for
from qatbench.results import RunRecord, TrialResult, write_text_atomic
from qatbench.spec.schema import ExperimentSpec, TrialSpec
from qatbench.sweep import folders
from qatbench.sweep.executor import Executor, Job, LocalProcessExecutor, results_as_completed
from qatbench.sweep.outcome import RunOutcome, check_expectations
from qatbench.sweep.progress import SweepProgress
from qatbench.sweep.signals import shielded, signals_interrupt
from qatbench.tracking.tags import env_tags, trial_env_tags
from qatbench.trial.shared_fp32 import shared_folder

if TYPE_CHECKING:
    from qatbench.tracking.tracker import SweepRun, Tracker

RESULT_FILE = "result.json"  # trials/<id>/result.json: the result before it is logged
SHARED_FOLDER = "shared"  # what the sweep's trials work out once (trial/shared_fp32.py)


class SweepLoop:
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
        self.tags = env_tags(record.env)
        self.json_path = run_dir / "report.json"
        self.html_path = run_dir / "report.html"

    def run(self) -> RunOutcome:
        interrupted: str | None = None
        with folders.locked(self.run_dir):
            self.record.save(self.json_path)
            done = {t.id for t in self.record.trials}
            todo = [t for t in self.trials if t.id not in done]
            try:
                progress = SweepProgress(self.console, len(todo))
                with (
                    signals_interrupt(),
                    progress.shown(),
                    self._phases_to(progress),
                    shared_folder(self.run_dir / SHARED_FOLDER, todo),
                ):
                    pending = []
                    for trial in todo:  # what an interrupted attempt got to, then the rest
                        recovered = self._recover(trial)
                        if recovered is None:
                            pending.append(trial)
                        else:
                            self._record(recovered, progress)

                    def started(job: Job) -> None:
                        progress.started(job.trial.id)

                    jobs = self._jobs(pending)
                    for trial, result in self._pooled(
                        results_as_completed(self.executor, jobs, started)
                    ):
                        out_dir = folders.trial_dir(self.run_dir, trial.id)
                        write_text_atomic(
                            out_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2)
                        )
                        self._record(result.with_run_id(self._log(result)), progress)
                    self._log_unlogged(done)
            except KeyboardInterrupt as exc:
                interrupted = getattr(exc, "signal_name", "SIGINT")
            finally:
                with shielded():  # a second Ctrl-C must not cut the report short
                    self.executor.stop()
                    self.record = with_picks(self.record)
                    self.record.save(self.json_path)
                    self._tag_picks()
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

    def _record(self, result: TrialResult, progress: SweepProgress) -> None:
        """Add a logged result to report.json, tell the progress, name a failure."""
        self.record = self.record.with_trial(result)
        self.record.save(self.json_path)
        progress.finished(result, baseline_for(self.record, result))
        if progress.live and not result.ok and result.error:
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
        result = _read_result(folders.trial_dir(self.run_dir, trial.id) / RESULT_FILE, trial.id)
        return None if result is None else result.with_run_id(self._log(result))

    def _jobs(self, trials: list[TrialSpec]) -> list[Job]:
        """A job per trial and timing pass, pass-major (every trial's first pass, then every
        trial's second, ...), each with a clean artifact folder: the trial's own for the
        first pass, ``pass-K`` inside it for pass K."""
        jobs = []
        for trial in trials:
            out_dir = folders.trial_dir(self.run_dir, trial.id)
            if out_dir.exists():  # what an interrupted attempt left: never mixed with this one
                shutil.rmtree(out_dir)
            for index, spec in enumerate(pass_specs(trial)):
                where = out_dir / f"pass-{index}" if index else out_dir
                jobs.append(Job(spec, where, trial.timeout_s, index))
        return sorted(jobs, key=lambda job: job.pass_index)

    def _pooled(
        self, finished: Iterator[tuple[Job, TrialResult]]
    ) -> Iterator[tuple[TrialSpec, TrialResult]]:
        """Each trial with its result once all its passes are in (see measure.passes)."""
        trials = {t.id: t for t in self.trials}
        got: dict[str, dict[int, TrialResult]] = {}
        for job, result in finished:
            trial = trials[job.trial.id]
            passes = got.setdefault(trial.id, {})
            passes[job.pass_index] = result
            if len(passes) == trial.measure.passes:
                yield trial, pool(trial, [passes[i] for i in sorted(passes)])
                for index in range(1, trial.measure.passes):
                    extra = folders.trial_dir(self.run_dir, trial.id) / f"pass-{index}"
                    shutil.rmtree(extra, ignore_errors=True)

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

    def _tag_picks(self) -> None:
        """The picks as MLflow tags on the picked runs; an outage only warns."""
        try:
            self.tracker.tag_picks(self.record.picks)
        except QatbenchError as exc:
            self.console.print(f"[yellow]warning[/] picks not tagged in MLflow: {escape(str(exc))}")

    def _log(self, result: TrialResult) -> str | None:
        try:
            return self.tracker.log_trial(
                result,
                params=result.params,
                tags=trial_env_tags(self.tags, result),
                sweep=self.sweep,
            )
        except QatbenchError as exc:
            self.console.print(
                f"[yellow]warning[/] {escape(result.id)}: not logged to MLflow: {escape(str(exc))}",
                highlight=False,
                soft_wrap=True,
            )
            return None

    @contextmanager
    def _phases_to(self, progress: SweepProgress) -> Iterator[None]:
        """Phase reports of the local executor's workers go to ``progress`` in the block."""
        if not isinstance(self.executor, LocalProcessExecutor):
            yield
            return
        self.executor.on_phase = progress.phase
        try:
            yield
        finally:
            self.executor.on_phase = None


def _read_result(path: Path, trial_id: str) -> TrialResult | None:
    """The result.json an interrupted sweep left for ``trial_id``; None if absent or torn."""
    try:
        result = TrialResult.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return result if result.id == trial_id else None
