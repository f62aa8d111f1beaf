"""Where ``METRIC:auto`` gates get their thresholds: the judged sweep's experiment in the
store (its previous sweeps) and, for trials without history, the latest ``qatbench
selftest`` logged to the same store."""

from __future__ import annotations

from collections.abc import Sequence

from qatbench.errors import TrackingError
from qatbench.report.auto_gate import (
    AutoThresholds,
    Threshold,
    auto_thresholds,
    fallback_threshold,
)
from qatbench.report.compare import Gate
from qatbench.report.sources import Sweep
from qatbench.results import RunRecord

SELFTEST_EXPERIMENT = "qatbench-selftest"
SELFTEST_METRIC = "selftest_min_detectable_slowdown"


def selftest_fallback(uri: str | None) -> Threshold:
    """The latest self-test's smallest detectable slowdown in ``uri``, else the default
    (also without a store: comparing two report.json files creates none)."""
    from qatbench.tracking import queries

    if not uri:
        return fallback_threshold(None)
    try:
        runs = queries.search_trials(uri, SELFTEST_EXPERIMENT)
    except TrackingError:
        runs = []
    for run in runs:  # newest first
        value = run["metrics"].get(SELFTEST_METRIC)
        if value is not None:
            return fallback_threshold(float(value), f"run {run['run_id'][:8]}")
    return fallback_threshold(None)


def thresholds_for(
    record: RunRecord,
    gates: Sequence[Gate],
    history: Sequence[Sweep] | None,
    uri: str | None,
) -> AutoThresholds | None:
    """Thresholds for the auto gates judging ``record``: from ``history`` (the sweeps before
    it, oldest first) when given, else from the store's sweeps of its experiment before it."""
    auto = [g for g in gates if g.auto]
    if not auto:
        return None
    metrics = sorted(
        {m for t in record.trials for m in t.metrics if any(g.matches(m) for g in auto)}
    )
    tracking = record.tracking or {}
    uri = uri or tracking.get("uri")
    if history is None:
        history = []
        name = tracking.get("experiment")
        if name:
            from qatbench.report.sources import load_sweeps

            try:
                _, _, sweeps = load_sweeps(str(name), uri, with_results=False)
            except TrackingError:
                sweeps = []
            ids = [s.id for s in sweeps]
            here = ids.index(tracking["sweep"]) if tracking.get("sweep") in ids else len(ids)
            history = sweeps[:here]
    return auto_thresholds(history, metrics, selftest_fallback(uri))
