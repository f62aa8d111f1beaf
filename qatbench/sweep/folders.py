"""Run folders of sweeps: where they go, which one to resume, and who may write one.

``reports/<experiment>/<UTC time>/`` holds ``report.json``, ``report.html`` and
``trials/<trial id>/``. Every name that becomes part of a path is checked to stay inside
the folder it belongs to, and a sweep folder is written by one process at a time. A
:class:`Shard` is a deterministic slice of an experiment's grid, for CI matrix jobs.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qatbench.errors import ConfigError
from qatbench.results import RunRecord
from qatbench.spec.schema import ExperimentSpec, TrialSpec, validate_experiment

TRIAL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$"  # what spec.NAME_PATTERN builds
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based): the trials of ``spec.expand()`` whose position
    is ``index - 1`` modulo ``count``, so the shards of a grid partition it, the same way on
    every machine, and stay balanced across models and methods."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N`` (``--shard 2/4``), checked: 1 <= I <= N."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match:
            index, count = int(match[1]), int(match[2])
            if 1 <= index <= count:
                return cls(index, count)
        raise ConfigError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 1/2")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def take(self, trials: list[TrialSpec]) -> list[TrialSpec]:
        """This shard's part of ``trials`` (a whole grid, in ``expand()`` order)."""
        return trials[self.index - 1 :: self.count]

    def ids(self, spec: ExperimentSpec) -> frozenset[str]:
        """The ids of this shard's trials of ``spec``."""
        return frozenset(t.id for t in self.take(spec.expand()))


SWEEP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"  # as tracking.tracker checks it


def sweep_id(experiment: str, given: str | None, run_key: str | None) -> str | None:
    """The sweep id a run was given (``--sweep-id``), or the one its ``--run-key`` derives
    (``<experiment>-<key>``, the same on every shard); None for a new one."""
    option, value = ("--sweep-id", given) if given is not None else ("--run-key", run_key)
    if value is None:
        return None
    candidate = value if given is not None else f"{experiment}-{value}"
    if not re.fullmatch(SWEEP_ID_PATTERN, candidate):
        raise ConfigError(
            f"{option} {value!r}: sweep id {candidate!r} is malformed; allowed: {SWEEP_ID_PATTERN}"
        )
    return candidate


def inside(base: Path, name: str, what: str) -> Path:
    """``base / name`` after checking that ``name`` is one plain path component that
    resolves inside ``base`` (no separators, no ``..``, no absolute path)."""
    if not re.fullmatch(TRIAL_ID_PATTERN, name) or name in (".", ".."):
        raise ConfigError(f"{what} {name!r} cannot be a folder name; allowed: {TRIAL_ID_PATTERN}")
    path = base / name
    if not path.resolve().is_relative_to(base.resolve()):
        raise ConfigError(f"{what} {name!r} would leave {base}")
    return path


def trial_dir(run_dir: Path, trial_id: str) -> Path:
    """The artifact folder of ``trial_id`` in a sweep folder, checked to stay inside it."""
    return inside(run_dir / "trials", trial_id, "trial id")


def new_run_dir(output_root: Path, experiment: str, created: dt.datetime) -> Path:
    """Create and return a fresh folder ``<output_root>/<experiment>/<UTC time>[-N]``."""
    base = inside(output_root, experiment, "experiment name")
    base.mkdir(parents=True, exist_ok=True)
    stamp = created.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        path = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue  # another sweep of this experiment started in the same second
        return path
    raise ConfigError(f"{base}: too many sweeps started at {stamp}")


def report_path(given: Path) -> Path:
    """The report.json named by ``given``: the file itself or a run folder holding it."""
    path = Path(given)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise ConfigError(f"{given}: no such report (a report.json or the run folder holding it)")
    return path


def stored_spec(record: RunRecord, source: Path) -> ExperimentSpec:
    """The validated experiment a sweep started with, as stored in its report."""
    data = record.experiment.get("spec")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the report holds no experiment spec to resume")
    return validate_experiment(data, source=f"{source} (experiment.spec)")


def find_unfinished(
    spec: ExperimentSpec, output_root: Path, source: Path, shard: Shard | None = None
) -> Path:
    """The report.json of the newest sweep of ``spec`` (of its ``shard``, if given) under
    ``output_root`` that lacks some trial of its grid, checked to have run the same
    experiment."""
    base = inside(output_root, spec.name, "experiment name")
    grid = shard.ids(spec) if shard else {t.id for t in spec.expand()}
    for path in sorted(base.glob("*/report.json"), key=_started, reverse=True):
        try:
            record = RunRecord.load(path)
        except ConfigError:
            continue  # not a report this version reads: never resumed by guess
        if record.experiment.get("shard") != (str(shard) if shard else None):
            continue  # another shard's sweep (or the whole grid's)
        if grid <= {t.id for t in record.trials}:
            continue
        stored = record.experiment.get("spec")
        current = spec.model_dump(mode="json")
        if stored != current:
            changed = sorted(
                k
                for k in set(current) | set(stored or {})
                if (stored or {}).get(k) != current.get(k)
            )
            raise ConfigError(
                f"{source}: the newest unfinished sweep {path} ran a different experiment "
                f"(changed: {', '.join(changed) or 'spec'}); resume it by its report "
                f"(qatbench run --resume {path}) or run without --resume"
            )
        return path
    what = f"{spec.name!r}" + (f" shard {shard}" if shard else "")
    raise ConfigError(
        f"{source}: no unfinished sweep of {what} under {base}; run without --resume to start one"
    )


def _started(path: Path) -> tuple[str, str]:
    """Sort key of a report: its folder's name, an UTC time with an optional -N suffix."""
    stamp, _, n = path.parent.name.partition("-")
    return stamp, n.zfill(4)


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the sweep folder's lock while in the block; refuse if another process holds it.

    The lock is an advisory ``flock`` on ``<run_dir>/.lock``, so the kernel drops it when
    its holder dies, even by SIGKILL: a killed sweep is never locked for its resume.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{run_dir}: another qatbench process is running this sweep"
            ) from None
        yield
    finally:
        os.close(fd)
