"""Where reports come from: a ``report.json`` file, or the sweeps of an MLflow experiment.

A sweep is what one ``qatbench run`` of an experiment logged: one run per trial. Runs tagged
``qatbench.sweep`` are grouped by that tag; untagged runs are grouped by time, oldest first,
a new sweep starting whenever a trial id repeats. Each run's ``trial.json`` artifact holds
the full :class:`~qatbench.results.TrialResult` (latency samples, per-layer error); a run
without one is rebuilt from its tags and metrics.

A source on the command line is ``mlflow:NAME`` (the latest sweep of experiment NAME),
``mlflow:NAME@K`` (sweep K in time order: 0 the first, -1 the latest, -2 the one before),
a path to a ``report.json``, or a bare experiment name when no such file exists.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qatbench.errors import ConfigError
from qatbench.results import RunRecord, TrialFailure, TrialResult

SWEEP_TAG = "qatbench.sweep"  # = qatbench.tracking.tracker.SWEEP_TAG, without importing mlflow
PARTIAL_TAG = "qatbench.partial"  # "true" on the runs of a sweep of part of a grid (pytest -k)
_ENDED = ("FINISHED", "FAILED")
MLFLOW_PREFIX = "mlflow:"
_T = TypeVar("_T")
_INDEX = re.compile(r"^(?P<name>.+)@(?P<index>-?\d+)$")


@dataclass(frozen=True)
class Sweep:
    """The trials of one sweep of an experiment, in the order they were logged."""

    id: str  # the qatbench.sweep tag, else "sweep-<ordinal>"
    started: str  # UTC, ISO 8601: when its first run started
    trials: tuple[TrialResult, ...]
    env: dict[str, Any]  # rebuilt from the runs' ``env.*`` tags
    partial: bool = False  # a run of part of the grid (pytest -k): no baseline by default


@dataclass(frozen=True)
class Source:
    """A parsed command-line source: a report file, or an experiment and a sweep index."""

    path: Path | None = None
    experiment: str = ""
    index: int = -1

    @property
    def label(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{MLFLOW_PREFIX}{self.experiment}" + ("" if self.index == -1 else f"@{self.index}")


def parse_source(text: str) -> Source:
    """``mlflow:NAME[@K]``, an existing file or ``*.json`` path, else an experiment name."""
    if text.startswith(MLFLOW_PREFIX):
        return _experiment_source(text[len(MLFLOW_PREFIX) :], text)
    if text.endswith(".json") or Path(text).is_file():
        return Source(path=Path(text))
    return _experiment_source(text, text)


def _experiment_source(spec: str, text: str) -> Source:
    match = _INDEX.match(spec)
    name, index = (match["name"], int(match["index"])) if match else (spec, -1)
    if not name.strip():
        raise ConfigError(f"{text!r}: no experiment name (expected mlflow:NAME or mlflow:NAME@K)")
    return Source(experiment=name, index=index)


def group_sweeps(runs: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs (each with ``tags`` and ``start_time``, any order) grouped into sweeps, oldest first.

    Within a sweep a trial logged twice keeps its latest run that ended.
    """
    ordered = sorted(runs, key=lambda r: (r.get("start_time") or 0, r.get("run_id", "")))
    tagged: dict[str, list[dict[str, Any]]] = {}
    untagged: list[list[dict[str, Any]]] = []
    seen: set[str] = set()
    for run in ordered:
        sweep = run.get("tags", {}).get(SWEEP_TAG)
        if sweep:
            tagged.setdefault(sweep, []).append(run)
            continue
        trial = _trial_id(run)
        if not untagged or trial in seen:
            untagged.append([])
            seen = set()
        untagged[-1].append(run)
        seen.add(trial)
    groups = [*tagged.values(), *untagged]
    groups.sort(key=lambda g: (g[0].get("start_time") or 0, g[0].get("run_id", "")))
    return [_latest_per_trial(g) for g in groups]


def _latest_per_trial(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per trial id, in first-seen order: the newest run that ended (FINISHED or
    FAILED), else the newest (a run whose logging broke off, e.g. a crash mid-log)."""
    chosen: dict[str, dict[str, Any]] = {}
    for run in runs:  # oldest first: a later run replaces an earlier one
        trial = _trial_id(run)
        kept = chosen.get(trial)
        if kept is None or run.get("status") in _ENDED or kept.get("status") not in _ENDED:
            chosen[trial] = run
    return list(chosen.values())


def _trial_id(run: dict[str, Any]) -> str:
    return str(run.get("tags", {}).get("qatbench.trial_id") or run.get("run_name") or "")


def trial_from_run(run: dict[str, Any]) -> TrialResult:
    """The run's ``trial.json`` as a TrialResult, or one rebuilt from its tags and metrics."""
    data = run.get("trial")
    if isinstance(data, dict):
        try:
            return TrialResult.from_dict(data).with_run_id(run["run_id"])
        except (KeyError, TypeError, ValueError):
            pass  # a malformed artifact: fall back on what MLflow itself holds
    tags = run.get("tags", {})
    finished = tags.get("qatbench.status", "finished") == "finished"
    error = None
    if not finished:
        phase, _, reason = str(tags.get("qatbench.error", "unknown: no reason logged")).partition(
            ": "
        )
        error = TrialFailure(phase=phase, reason=reason)
    return TrialResult(
        id=_trial_id(run),
        model=str(tags.get("model", "")),
        method=str(tags.get("method", "")),
        bits=str(tags.get("bits", "")),
        runtime=str(tags.get("runtime", "")),
        status="finished" if finished else "failed",
        metrics={k: float(v) for k, v in run.get("metrics", {}).items()},
        error=error,
        mlflow_run_id=run.get("run_id"),
    )


def _iso(ms: int | None) -> str:
    return dt.datetime.fromtimestamp((ms or 0) / 1000, dt.UTC).isoformat(timespec="seconds")


def _tag_value(text: str) -> Any:
    """A tag written as ``str(value)`` back as the scalar it was: None, a bool, an int."""
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def _env(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The scalar environment fields the runner logs as ``env.*`` tags."""
    tags = runs[0].get("tags", {}) if runs else {}
    return {
        k[len("env.") :]: _tag_value(str(v))
        for k, v in sorted(tags.items())
        if k.startswith("env.")
    }


def _sweep(group: list[dict[str, Any]], ordinal: int) -> Sweep:
    tag = group[0].get("tags", {}).get(SWEEP_TAG)
    return Sweep(
        id=str(tag) if tag else f"sweep-{ordinal}",
        started=_iso(group[0].get("start_time")),
        trials=tuple(trial_from_run(r) for r in group),
        env=_env(group),
        partial=any(r.get("tags", {}).get(PARTIAL_TAG) == "true" for r in group),
    )


def sweeps_from_runs(runs: Sequence[dict[str, Any]]) -> list[Sweep]:
    """Runs as :func:`qatbench.tracking.queries.fetch_trial_runs` returns them, as sweeps,
    oldest first."""
    return [_sweep(group, i) for i, group in enumerate(group_sweeps(runs), start=1)]


def load_sweeps(
    experiment: str, tracking_uri: str | None = None, *, with_results: bool = True
) -> tuple[str, str, list[Sweep]]:
    """``(uri, experiment_id, sweeps)`` of an MLflow experiment, oldest sweep first.

    ``with_results=False`` skips downloading each run's ``trial.json`` (no samples, no
    per-layer rows, but much faster on a remote server).
    """
    from qatbench.tracking import queries, store  # imports mlflow: only when a store is really read

    uri = tracking_uri or store.default_uri()
    experiment_id, runs = queries.fetch_trial_runs(uri, experiment, with_results=with_results)
    return uri, experiment_id, sweeps_from_runs(runs)


def load_sweep(
    experiment: str, index: int = -1, tracking_uri: str | None = None
) -> tuple[str, str, Sweep]:
    """``(uri, experiment_id, sweep)``: sweep ``index`` of an experiment with every trial's
    ``trial.json``, downloading only that sweep's artifacts."""
    from qatbench.tracking import queries, store  # imports mlflow: only when a store is really read

    uri = tracking_uri or store.default_uri()
    experiment_id, runs = queries.fetch_trial_runs(uri, experiment, with_results=False)
    groups = group_sweeps(runs)
    group = pick(groups, index, f"{MLFLOW_PREFIX}{experiment}@{index}")
    results = queries.fetch_trial_results(uri, [r["run_id"] for r in group])
    group = [{**r, "trial": results.get(r["run_id"])} for r in group]
    return uri, experiment_id, _sweep(group, index % len(groups) + 1)


def sweep_record(
    experiment: str, uri: str, experiment_id: str, sweep: Sweep, *, source: str = ""
) -> RunRecord:
    """One sweep as a RunRecord, as ``report.json`` would have held it."""
    return RunRecord(
        experiment={"name": experiment, "source": source or f"{MLFLOW_PREFIX}{experiment}"},
        created=sweep.started,
        env=sweep.env,
        trials=sweep.trials,
        tracking={
            "uri": uri,
            "experiment_id": experiment_id,
            "experiment": experiment,
            "sweep": sweep.id,
        },
    )


def pick(sweeps: Sequence[_T], index: int, where: str) -> _T:
    """Sweep ``index`` (Python-style: -1 the latest) or a ConfigError saying how many exist."""
    if not sweeps:
        raise ConfigError(f"{where}: the experiment has no trial runs")
    try:
        return sweeps[index]
    except IndexError:
        raise ConfigError(
            f"{where}: no sweep {index}; the experiment has {len(sweeps)} "
            f"(0 to {len(sweeps) - 1}, or -1 to -{len(sweeps)})"
        ) from None


def load_record(text: str, tracking_uri: str | None = None) -> RunRecord:
    """The RunRecord named by a command-line source (see the module docstring)."""
    source = parse_source(text)
    if source.path is not None:
        return RunRecord.load(source.path)
    uri, experiment_id, sweep = load_sweep(source.experiment, source.index, tracking_uri)
    return sweep_record(source.experiment, uri, experiment_id, sweep, source=source.label)
