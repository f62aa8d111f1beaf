"""The plugin's session state: the worker executor, and per experiment its MLflow
experiment and the report.json it keeps current; written out when the session ends."""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from qatbench.errors import QatbenchError
from qatbench.tracking.tags import env_tags

if TYPE_CHECKING:
    from qatbench.results import RunRecord, TrialResult
    from qatbench.sweep.executor import LocalProcessExecutor
    from qatbench.tracking.tracker import Tracker

INI_TRACKING_URI = "qatbench_tracking_uri"
PARTIAL_TAG = "qatbench.partial"  # = qatbench.report.sources.PARTIAL_TAG


@dataclass
class ExperimentRun:
    """One experiment's sweep in this session: its MLflow experiment, and the report.json
    it keeps current. Its runs carry the sweep id (tag ``qatbench.sweep``) as those of
    ``qatbench run`` do, so ``qatbench compare mlflow:NAME`` and ``history`` see it."""

    tracker: Tracker
    record: RunRecord
    run_dir: Path
    tags: dict[str, str]

    @property
    def sweep(self) -> str:
        return str(self.record.tracking["sweep"])

    def trial_dir(self, trial_id: str) -> Path:
        from qatbench.sweep import folders

        return folders.trial_dir(self.run_dir, trial_id)

    @property
    def report_json(self) -> Path:
        return self.run_dir / "report.json"

    @property
    def report_html(self) -> Path:
        return self.run_dir / "report.html"

    def add(self, result: TrialResult, tags: dict[str, str] | None = None) -> TrialResult:
        """Log ``result`` to MLflow, add it to report.json, and return it with its run id.

        A store that refuses the run is a warning, as in ``qatbench run``: the result
        still counts and still goes into the report."""
        try:
            run_id = self.tracker.log_trial(
                result, params=result.params, tags={**self.tags, **(tags or {})}, sweep=self.sweep
            )
        except QatbenchError as exc:
            warnings.warn(f"{result.id}: not logged to MLflow: {exc}", stacklevel=2)
            run_id = None
        result = result.with_run_id(run_id)
        self.record = self.record.with_trial(result)
        self.record.save(self.report_json)
        return result


@dataclass
class SessionState:
    """Everything the plugin and its fixtures share during one pytest session."""

    config: pytest.Config
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    experiments: dict[tuple[str, str], ExperimentRun] = field(default_factory=dict)
    # Experiments of which only part of the grid was selected (-k, -m, a node id), with
    # (selected, total) trials: their sweeps are tagged partial, no --baseline previous.
    partial: dict[str, tuple[int, int]] = field(default_factory=dict)
    _executor: LocalProcessExecutor | None = None

    @property
    def root(self) -> Path:
        return self.config.invocation_params.dir

    @property
    def output_root(self) -> Path:
        return self.root / str(self.config.getoption("qatbench_output_dir") or "reports")

    @property
    def executor(self) -> LocalProcessExecutor:
        if self._executor is None:
            from qatbench.sweep.executor import LocalProcessExecutor

            self._executor = LocalProcessExecutor()
        return self._executor

    def tracking_uri(self, yaml_uri: str | None) -> str | None:
        """The command line's URI, else the YAML's, else the ini option's, else None
        (the embedded store under ``mlruns/`` of the invocation folder)."""
        option = self.config.getoption("qatbench_tracking_uri")
        ini = str(self.config.getini(INI_TRACKING_URI) or "").strip()
        return option or yaml_uri or ini or None

    def experiment(
        self,
        name: str,
        *,
        yaml_uri: str | None = None,
        source: str,
        spec: dict[str, Any] | None = None,
        threads: int | None = None,
    ) -> ExperimentRun:
        """The session's run of experiment ``name``, created (with its MLflow experiment)
        on first use."""
        uri = self.tracking_uri(yaml_uri)
        key = (name, uri or "")
        if key not in self.experiments:
            from qatbench.measure.env import fingerprint
            from qatbench.results import RunRecord
            from qatbench.sweep import folders
            from qatbench.sweep.runner import new_sweep_id
            from qatbench.tracking.tracker import Tracker

            tracker = Tracker(uri, name, root=self.root)
            env = fingerprint(threads=threads)
            experiment: dict[str, Any] = {"name": name, "source": source, "spec": spec}
            tags = _tags(env)
            if name in self.partial:
                selected, total = self.partial[name]
                experiment["partial"] = f"{selected} of {total} trials"
                tags[PARTIAL_TAG] = "true"
            record = RunRecord(
                experiment=experiment,
                created=self.started.isoformat(timespec="seconds"),
                env=env,
                tracking={
                    "uri": tracker.uri,
                    "experiment_id": tracker.experiment_id,
                    "experiment": tracker.experiment_name,
                    "sweep": new_sweep_id(self.started),
                },
            )
            run_dir = folders.new_run_dir(self.output_root, name, self.started)
            run = ExperimentRun(tracker, record, run_dir, tags)
            run.record.save(run.report_json)
            self.experiments[key] = run
        return self.experiments[key]

    def finish(self) -> None:
        from qatbench.report.html import write_html
        from qatbench.report.pick import with_picks

        if self._executor is not None:
            self._executor.stop()
        for run in self.experiments.values():
            run.record = with_picks(run.record)
            run.record.save(run.report_json)
            write_html(run.record, run.report_html)


def _tags(env: dict[str, Any]) -> dict[str, str]:
    """Tags of every run the plugin logs: where it came from and the machine it ran on."""
    return {"qatbench.source": "pytest", **env_tags(env)}


SESSION_STATE = pytest.StashKey[SessionState]()


def session_state(config: pytest.Config) -> SessionState:
    """The plugin's state for this session (created on first use)."""
    if SESSION_STATE not in config.stash:
        config.stash[SESSION_STATE] = SessionState(config)
    return config.stash[SESSION_STATE]
