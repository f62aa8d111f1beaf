"""Merge the report.json files of a sharded sweep (``qatbench run --shard I/N`` in CI matrix
jobs) into one report (``qatbench merge``).

Every report must be of the same experiment (name and validated spec). A trial id found in
two reports is an error unless both results are identical. Fields of ``env`` and
``tracking`` on which all reports agree are kept as they are; where the shards differ
(another machine, another sweep id) each report's whole ``env``/``tracking`` is kept, in
order, under ``shards``. Trials keep their own ``details["env"]`` (the node that ran them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatbench.errors import ConfigError
from qatbench.results import RunRecord, TrialResult


def merge_records(reports: list[tuple[Path, RunRecord]]) -> RunRecord:
    """One record holding every trial of ``reports`` (path, record), in report order."""
    if not reports:
        raise ConfigError("merge: no report given")
    first_path, first = reports[0]
    name = first.experiment.get("name")
    for path, record in reports[1:]:
        if record.experiment.get("name") != name:
            raise ConfigError(
                f"{path}: experiment {record.experiment.get('name')!r} is not "
                f"{name!r} of {first_path}; only shards of one experiment merge"
            )
        if record.experiment.get("spec") != first.experiment.get("spec"):
            raise ConfigError(
                f"{path}: experiment {name!r} ran with other settings than in {first_path} "
                "(experiment.spec differs); only shards of one experiment merge"
            )
    trials: dict[str, tuple[Path, TrialResult]] = {}
    for path, record in reports:
        for trial in record.trials:
            seen = trials.get(trial.id)
            if seen is None:
                trials[trial.id] = (path, trial)
            elif seen[1] != trial:
                raise ConfigError(
                    f"{path}: trial {trial.id} is also in {seen[0]} with a different result; "
                    "merge shards of one sweep, or drop one of the reports"
                )
    experiment = {k: v for k, v in first.experiment.items() if k != "shard"}
    shards = [r.experiment.get("shard") for _, r in reports]
    if any(shards):
        experiment["shards"] = shards
    experiment["merged_from"] = [str(p) for p, _ in reports]
    labels = [str(p) for p, _ in reports]
    return RunRecord(
        experiment=experiment,
        created=min(r.created for _, r in reports),
        env=_common([r.env for _, r in reports], labels),
        tracking=_common([r.tracking for _, r in reports], labels),
        trials=tuple(t for _, t in trials.values()),
    )


def load_and_merge(paths: list[Path]) -> RunRecord:
    """:func:`merge_records` of the report.json files at ``paths``; one file twice is refused."""
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise ConfigError(f"{path}: given twice")
        seen.add(path.resolve())
    return merge_records([(p, RunRecord.load(p)) for p in paths])


def _common(dicts: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """The items all ``dicts`` share; if they differ anywhere, also each one in ``shards``."""
    first = dicts[0]
    common = {k: v for k, v in first.items() if all(k in d and d[k] == v for d in dicts)}
    if all(d == first for d in dicts):
        return common
    return {
        **common,
        "shards": [{"report": label, **d} for label, d in zip(labels, dicts, strict=True)],
    }
