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

This module holds the hooks and options; the items are :mod:`qatbench.pytest_plugin.items`, the
session's trackers and reports :mod:`qatbench.pytest_plugin.session`, and the fixtures, which
:func:`pytest_configure` registers, :mod:`qatbench.pytest_plugin.fixtures`. Importing it is cheap:
torch and mlflow load only once a trial runs.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import Any

import pytest

from qatbench.pytest_plugin.items import MARKER, ExperimentFile
from qatbench.pytest_plugin.session import INI_TRACKING_URI, SESSION_STATE, session_state

INI_EXPERIMENTS = "qatbench_experiments"


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
    from qatbench.pytest_plugin import fixtures as pytest_fixtures

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


# --- the end of the session ----------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(SESSION_STATE, None)
    if state is not None:
        state.finish()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Note each experiment file of which only part of the grid was selected (-k, -m, node
    ids): its sweep is tagged partial, so that ``--baseline previous`` passes over it."""
    from qatbench.pytest_plugin.items import TrialItem

    selected: dict[str, set[str]] = {}
    totals: dict[str, int] = {}
    for item in session.items:
        if isinstance(item, TrialItem):
            name = item.spec.tracking.experiment or item.spec.name
            selected.setdefault(name, set()).add(item.trial.id)
            totals[name] = len(item.spec.expand())
    state = session_state(session.config)
    for name, ids in selected.items():
        if len(ids) < totals[name]:
            state.partial[name] = (len(ids), totals[name])


def pick_line(pick: dict[str, Any]) -> str:
    """One pick of report.json as a plain line."""
    where = f"{pick['model']} on {pick['runtime']}"
    where += f" at batch {pick['batch_size']}" if pick.get("batch_size") else ""
    if pick.get("trial_id"):
        return f"pick {where}: {pick['trial_id']}: {pick.get('why', '')}"
    return f"no pick {where}: {pick.get('why', '')}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(SESSION_STATE, None)
    if state is None or not state.experiments:
        return
    from rich.console import Console

    from qatbench.report.summary import NARROW_WIDTH, results_table

    terminalreporter.section("qatbench")
    for run in state.experiments.values():
        tracking = run.record.tracking
        if run.record.trials:
            console = Console(
                file=io.StringIO(),
                width=NARROW_WIDTH,
                force_terminal=terminalreporter.hasmarkup,
                soft_wrap=False,
            )
            console.print(results_table(run.record))
            terminalreporter.write(console.file.getvalue())  # type: ignore[attr-defined]
        partial = run.record.experiment.get("partial")
        terminalreporter.write_line(
            f"{tracking.get('experiment')}: {len(run.record.trials)} trials"
            + (f" (partial: {partial}; not a --baseline previous)" if partial else "")
            + f"; mlflow {tracking.get('uri')}"
        )
        for pick in run.record.picks:  # the answer first (qatbench/report/pick.py)
            terminalreporter.write_line(f"  {pick_line(pick)}")
        terminalreporter.write_line(f"  report.json: {run.report_json}")
        terminalreporter.write_line(f"  report.html: {run.report_html}")
