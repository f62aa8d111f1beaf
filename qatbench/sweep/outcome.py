"""What a finished (or interrupted) sweep leaves behind: its outcome, exit code and the
expectations its trials breached."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qatbench.results import RunRecord, TrialResult
from qatbench.spec.schema import ExperimentSpec

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
