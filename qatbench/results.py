"""Results as plain, frozen, JSON-able data: what a trial produced and what a run holds.

``TrialResult`` comes back from a worker process; ``RunRecord`` is the content of
``report.json``. Both round-trip through ``to_dict``/``from_dict``; the persisted form
carries :data:`SCHEMA_VERSION` and an older or newer major version is refused with a
clear error rather than misread.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from qatbench.errors import ConfigError

SCHEMA_VERSION = 1

Status = Literal["finished", "failed"]


@dataclass(frozen=True)
class TrialFailure:
    """Why a trial failed: the lifecycle phase it was in and a one-line reason."""

    phase: str
    reason: str


@dataclass(frozen=True)
class TrialResult:
    """Everything one trial measured. Metric names carry their units."""

    id: str
    model: str
    method: str
    bits: str
    runtime: str
    status: Status
    metrics: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per lifecycle step
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path
    params: dict[str, Any] = field(default_factory=dict)  # method options, thread settings
    details: dict[str, Any] = field(default_factory=dict)  # per-layer error, samples, warnings
    error: TrialFailure | None = None
    mlflow_run_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "finished"

    def with_run_id(self, run_id: str | None) -> TrialResult:
        return replace(self, mlflow_run_id=run_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        error = data.get("error")
        return cls(
            id=data["id"],
            model=data["model"],
            method=data["method"],
            bits=data["bits"],
            runtime=data["runtime"],
            status=data["status"],
            metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
            phases={k: float(v) for k, v in data.get("phases", {}).items()},
            artifacts=dict(data.get("artifacts", {})),
            params=dict(data.get("params", {})),
            details=dict(data.get("details", {})),
            error=TrialFailure(**error) if error else None,
            mlflow_run_id=data.get("mlflow_run_id"),
        )


@dataclass(frozen=True)
class RunRecord:
    """The content of ``report.json``: one experiment run and every trial's result."""

    experiment: dict[str, Any]  # name, source file, the validated spec
    created: str  # UTC, ISO 8601
    env: dict[str, Any]
    trials: tuple[TrialResult, ...] = ()
    tracking: dict[str, Any] = field(default_factory=dict)  # uri, experiment id
    # the best trial within the quality budget per model x runtime x batch size, as plain
    # data (qatbench/report/pick.py); recomputed when the run ends
    picks: tuple[dict[str, Any], ...] = ()
    schema_version: int = SCHEMA_VERSION

    def with_trial(self, result: TrialResult) -> RunRecord:
        """A copy with ``result`` added, replacing an earlier result of the same id."""
        kept = tuple(t for t in self.trials if t.id != result.id)
        return replace(self, trials=(*kept, result))

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema_version": self.schema_version,
            "experiment": self.experiment,
            "created": self.created,
            "env": self.env,
            "tracking": self.tracking,
            "trials": [t.to_dict() for t in self.trials],
        }
        if self.picks:
            out["picks"] = [dict(p) for p in self.picks]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "report") -> RunRecord:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{source}: schema_version {version!r} is not supported; this qatbench "
                f"reads schema_version {SCHEMA_VERSION}"
            )
        return cls(
            experiment=data["experiment"],
            created=data["created"],
            env=data.get("env", {}),
            tracking=data.get("tracking", {}),
            trials=tuple(TrialResult.from_dict(t) for t in data.get("trials", [])),
            picks=tuple(dict(p) for p in data.get("picks", [])),
        )

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file in the same folder, then a rename."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such report") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path}: not a JSON report ({exc.msg} at line {exc.lineno})"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a qatbench report (top level is not an object)")
        return cls.from_dict(data, source=str(path))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 is for secrets, not reports
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's file-mode creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
