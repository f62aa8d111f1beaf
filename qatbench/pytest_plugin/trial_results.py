"""A trial's result as pytest sees it: failed or breached (one line), and its user_properties."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qatbench.results import TrialResult
    from qatbench.spec.schema import ExperimentSpec

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


class TrialFailed(Exception):
    """A trial failed or breached an expectation; the message is the one line to show."""


def fail_on(spec: ExperimentSpec, result: TrialResult) -> None:
    """Raise :class:`TrialFailed` when ``result`` failed or breached one of ``spec``'s
    expectations: the same expectations, checked the same way, as ``qatbench run``."""
    from qatbench.results import RunRecord
    from qatbench.sweep.outcome import check_expectations

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
