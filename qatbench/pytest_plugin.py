"""pytest plugin: YAML experiments as pytest items, one per trial; fixtures for Python benchmarks.

Installed through the ``pytest11`` entry point, so pytest loads it in every project where
qatbench is installed; it therefore collects nothing until a run opts in, with the flag
``--qatbench`` or the ini option ``qatbench_experiments``::

    pytest --qatbench experiments/quickstart.yaml          # one item per trial
    pytest --qatbench experiments/quickstart.yaml -k "ptq and onnxruntime" --junitxml=out.xml

    # pyproject.toml: a plain `pytest` then runs these experiments too
    [tool.pytest.ini_options]
    qatbench_experiments = ["experiments/quickstart.yaml"]

Only experiment files named on the command line or listed in the ini option (paths or
globs, relative to the ini file) are collected; a directory is never searched for YAML.
Each item runs its trial in an isolated worker process, logs it to MLflow (one experiment
per YAML, created once per session) and adds it to the session's ``report.json``, which is
rewritten after every trial; ``report.html`` follows at the end of the session. A failed
trial or a breached expectation fails the item with one line, without a traceback.

Importing this module is cheap: torch and mlflow load only once a trial runs.
"""

from __future__ import annotations

import datetime as dt
import glob
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from qatbench.errors import QatbenchError

if TYPE_CHECKING:
    from qatbench.executor import LocalProcessExecutor
    from qatbench.results import RunRecord, TrialResult
    from qatbench.spec import ExperimentSpec, TrialSpec
    from qatbench.tracking.tracker import Tracker

INI_EXPERIMENTS = "qatbench_experiments"
INI_TRACKING_URI = "qatbench_tracking_uri"
MARKER = "qatbench"
# Metrics copied into each item's user_properties (and so into JUnit XML), when reported.
KEY_METRICS = (
    "size_bytes",
    "compression_ratio",
    "mse",
    "sqnr_db",
    "cosine",
    "accuracy",
    "accuracy_delta_vs_fp32",
    "int_op_fraction",
)
_PER_BATCH = re.compile(r"^(latency_p50_ms|throughput_per_s|speedup_vs_fp32)_b\d+$")


# --- options -------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qatbench", "qatbench experiments")
    group.addoption(
        "--qatbench",
        action="store_true",
        default=False,
        help="collect the YAML experiment files named on the command line: one item per trial",
    )
    group.addoption(
        "--qatbench-tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow tracking URI for every trial (default: the YAML's, else "
        f"the ini option {INI_TRACKING_URI}, else sqlite:///mlruns/mlflow.db)",
    )
    group.addoption(
        "--qatbench-output-dir",
        default="reports",
        metavar="DIR",
        help="folder for the session's report.json and report.html (default: reports)",
    )
    parser.addini(
        INI_EXPERIMENTS,
        type="args",
        default=[],
        help="experiment YAML files or globs (relative to the ini file) collected as tests",
    )
    parser.addini(
        INI_TRACKING_URI,
        type="string",
        default="",
        help="MLflow tracking URI for trials whose YAML names none",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}: a qatbench trial collected from a YAML experiment file"
    )
    # MLflow's own use of SQLAlchemy, on every first write to a store: not the user's concern.
    config.addinivalue_line(
        "filterwarnings", "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
    )
    from qatbench import pytest_fixtures

    if not config.pluginmanager.is_registered(pytest_fixtures):
        config.pluginmanager.register(pytest_fixtures, "qatbench.fixtures")
    listed = _ini_experiments(config)
    config.stash[_LISTED] = listed
    named = {p for p in _named_on_command_line(config) if p.suffix in (".yaml", ".yml")}
    config.stash[_NAMED] = named
    if config.getoption("qatbench") and not listed and not named:
        config.issue_config_time_warning(
            pytest.PytestConfigWarning(
                "--qatbench: no experiment file named; folders are not searched for YAML "
                "(e.g. pytest --qatbench experiments/quickstart.yaml)"
            ),
            stacklevel=2,
        )
    # Like testpaths: the listed experiments join a run that names no paths of its own.
    if listed and config.args_source != pytest.Config.ArgsSource.ARGS:
        known = {Path(a).resolve() for a in config.args}
        config.args.extend(str(p) for p in sorted(listed) if p not in known)


def _ini_experiments(config: pytest.Config) -> set[Path]:
    base = config.inipath.parent if config.inipath else config.rootpath
    found: set[Path] = set()
    for pattern in config.getini(INI_EXPERIMENTS):
        full = str(base / pattern)
        matches = glob.glob(full, recursive=True) if glob.has_magic(full) else [full]
        found.update(Path(m).resolve() for m in matches)
    return found


def _named_on_command_line(config: pytest.Config) -> set[Path]:
    here = config.invocation_params.dir
    args = getattr(config.option, "file_or_dir", None) or []
    return {(here / str(a).split("::", 1)[0]).resolve() for a in args}


_LISTED = pytest.StashKey[set[Path]]()  # experiment files the ini option lists
_NAMED = pytest.StashKey[set[Path]]()  # YAML files named on the command line


def _opted_in(config: pytest.Config) -> bool:
    return bool(config.getoption("qatbench") or config.getini(INI_EXPERIMENTS))


# --- collection ----------------------------------------------------------------------------


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    config = parent.config
    if not _opted_in(config):
        return None
    path = file_path.resolve()
    if path in config.stash.get(_LISTED, set()) or path in config.stash.get(_NAMED, set()):
        experiment_file: pytest.Collector = ExperimentFile.from_parent(parent, path=file_path)
        return experiment_file
    return None


class OneLine:
    """A failure shown as one line: in the terminal, the summary and JUnit XML alike."""

    def __init__(self, message: str, path: Path) -> None:
        self.message = message
        # What pytest's short summary and junitxml read for the one-line message.
        self.reprcrash = _Crash(str(path), 0, message)

    def toterminal(self, tw: Any) -> None:
        tw.line(self.message, red=True, bold=True)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class _Crash:
    path: str
    lineno: int
    message: str


class ExperimentFile(pytest.File):
    """A YAML experiment file; its trials are the items. An invalid file is one error."""

    def collect(self) -> Iterator[pytest.Item]:
        from qatbench.spec import load_experiment

        # Messages name the file as the user did: relative to where pytest started.
        here = Path.cwd()
        spec = load_experiment(
            self.path.relative_to(here) if self.path.is_relative_to(here) else self.path
        )
        for trial in spec.expand():
            yield TrialItem.from_parent(self, name=trial.id, spec=spec, trial=trial)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Any:  # type: ignore[override]  # pytest's own return type is wider than its stubs
        if isinstance(excinfo.value, QatbenchError):
            return OneLine(str(excinfo.value), self.path)
        return super().repr_failure(excinfo)


class TrialFailed(Exception):
    """A trial failed or breached an expectation; the message is the one line to show."""


class TrialItem(pytest.Item):
    """One trial of an experiment file, run in an isolated worker process."""

    def __init__(self, *, spec: ExperimentSpec, trial: TrialSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.trial = trial
        self.add_marker(MARKER)
        # -k matches any of these words, e.g. -k "ptq and onnxruntime".
        self.extra_keyword_matches.update(
            {trial.model.name, trial.method.name, trial.bits, trial.runtime}
        )

    def runtest(self) -> None:
        session = session_state(self.config)
        experiment = session.experiment(
            self.spec.tracking.experiment or self.spec.name,
            yaml_uri=self.spec.tracking.uri,
            source=str(self.path),
            spec=self.spec.model_dump(mode="json"),
            threads=self.spec.measure.threads,
        )
        trial_dir = experiment.trial_dir(self.trial.id)
        result = session.executor.run(self.trial, trial_dir, self.trial.timeout_s)
        result = experiment.add(result, tags={"qatbench.pytest.nodeid": self.nodeid})
        self.user_properties.extend(result_properties(result))
        fail_on(self.spec, result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Any:  # type: ignore[override]  # see ExperimentFile.repr_failure
        if isinstance(excinfo.value, TrialFailed | QatbenchError):
            return OneLine(str(excinfo.value), self.path)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"trial {self.trial.id}"


def fail_on(spec: ExperimentSpec, result: TrialResult) -> None:
    """Raise :class:`TrialFailed` when ``result`` failed or breached one of ``spec``'s
    expectations: the same expectations, checked the same way, as ``qatbench run``."""
    from qatbench.results import RunRecord
    from qatbench.sweep_outcome import check_expectations

    if not result.ok:
        error = result.error
        where = f"failed in {error.phase}: {error.reason}" if error else "failed"
        raise TrialFailed(f"{where} ({result.id})")
    alone = RunRecord(experiment={"name": spec.name}, created="", env={}, trials=(result,))
    breaches = check_expectations(spec, alone)
    if breaches:
        raise TrialFailed("; ".join(breaches))


def result_properties(result: TrialResult, prefix: str = "") -> list[tuple[str, object]]:
    """(name, value) pairs for an item's user_properties: status, run id, key metrics."""
    props: list[tuple[str, object]] = [
        (f"{prefix}trial_id", result.id),
        (f"{prefix}status", result.status),
    ]
    if result.mlflow_run_id:
        props.append((f"{prefix}mlflow_run_id", result.mlflow_run_id))
    if result.error:
        props.append((f"{prefix}error", f"{result.error.phase}: {result.error.reason}"))
    for name, value in result.metrics.items():
        if name in KEY_METRICS or _PER_BATCH.match(name):
            props.append((f"{prefix}{name}", f"{value:.6g}"))
    return props


# --- the session: trackers, reports, the worker executor ----------------------------------


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
        from qatbench import sweeps

        return sweeps.trial_dir(self.run_dir, trial_id)

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
            from qatbench.executor import LocalProcessExecutor

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
            from qatbench import sweeps
            from qatbench.measure.env import fingerprint
            from qatbench.results import RunRecord
            from qatbench.runner import new_sweep_id
            from qatbench.tracking.tracker import Tracker

            tracker = Tracker(uri, name, root=self.root)
            env = fingerprint(threads=threads)
            record = RunRecord(
                experiment={"name": name, "source": source, "spec": spec},
                created=self.started.isoformat(timespec="seconds"),
                env=env,
                tracking={
                    "uri": tracker.uri,
                    "experiment_id": tracker.experiment_id,
                    "experiment": tracker.experiment_name,
                    "sweep": new_sweep_id(self.started),
                },
            )
            run_dir = sweeps.new_run_dir(self.output_root, name, self.started)
            run = ExperimentRun(tracker, record, run_dir, _tags(env))
            run.record.save(run.report_json)
            self.experiments[key] = run
        return self.experiments[key]

    def finish(self) -> None:
        from qatbench.report.html import write_html

        if self._executor is not None:
            self._executor.stop()
        for run in self.experiments.values():
            run.record.save(run.report_json)
            write_html(run.record, run.report_html)


def _tags(env: dict[str, Any]) -> dict[str, str]:
    """Tags of every run the plugin logs: where it came from and the machine it ran on."""
    tags = {"qatbench.source": "pytest"}
    tags |= {f"env.{k}": str(v) for k, v in env.items() if not isinstance(v, dict | list)}
    if env.get("git_commit"):
        tags["mlflow.source.git.commit"] = str(env["git_commit"])
    return tags


_STATE = pytest.StashKey[SessionState]()


def session_state(config: pytest.Config) -> SessionState:
    """The plugin's state for this session (created on first use)."""
    if _STATE not in config.stash:
        config.stash[_STATE] = SessionState(config)
    return config.stash[_STATE]


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is not None:
        state.finish()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not state.experiments:
        return
    terminalreporter.section("qatbench")
    for run in state.experiments.values():
        tracking = run.record.tracking
        terminalreporter.write_line(
            f"{tracking.get('experiment')}: {len(run.record.trials)} trials; "
            f"mlflow {tracking.get('uri')}"
        )
        terminalreporter.write_line(f"  report.json: {run.report_json}")
        terminalreporter.write_line(f"  report.html: {run.report_html}")
