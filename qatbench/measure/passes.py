"""A trial timed in several passes spread over its sweep, and the passes pooled into one.

Busy spells on a shared machine outlast a trial: within one trial process the repeats of
a speed-up agree, but the next process can sit in another spell and read 10-15% off. With
``measure.passes: k`` a sweep runs every trial k times, pass-major (every trial once, then
every trial again, ...), each pass a fresh worker with ``1/k`` of the timing budget and
of the repeats. Its rounds are then pooled into one result, so the speed-up samples k
moments of the sweep instead of one (randomized multiple interleaved trials, as Abedi and
Brecht recommend for cloud machines). Everything but the latency metrics comes from the
first pass, the generation timings of language models included. On a cluster
(``--executor ray``) passes of one trial may run on different nodes at once: use passes
on one machine, or with ``--ray-one-per-node`` on identical ones.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from qatbench.measure.latency_metrics import batch_metrics, is_timing_warning
from qatbench.results import TrialResult

if TYPE_CHECKING:  # configs of the spec layer above, for annotations only
    from qatbench.spec.schema import TrialSpec

_REPEAT_LABELS = ("repeat_of_round", "compiled_repeat_of_round")


def pass_specs(trial: TrialSpec) -> list[TrialSpec]:
    """The trial's passes: one when ``measure.passes`` is 1, else k with a share each.

    Later passes skip the per-layer breakdown, which does not depend on timing.
    """
    k = trial.measure.passes
    if k == 1:
        return [trial]
    share = {
        "passes": 1,
        "max_time_s": trial.measure.max_time_s / k,
        "min_rounds": max(3, math.ceil(trial.measure.min_rounds / k)),
        "repeats": math.ceil(trial.measure.repeats / k),
    }
    first = trial.measure.model_copy(update=share)
    later = trial.measure.model_copy(update={**share, "per_layer": False})
    return [replace(trial, measure=first)] + [replace(trial, measure=later)] * (k - 1)


def pool(trial: TrialSpec, passes: list[TrialResult]) -> TrialResult:
    """One result of ``trial`` from its passes: the first pass with every timing metric
    computed again from the rounds of all of them, and the trial's own measure settings
    as params; the first failed pass if any failed."""
    failed = next((r for r in passes if not r.ok), None)
    if failed is not None or len(passes) == 1:
        return failed or passes[0]
    first = passes[0]
    params = {**first.params, "measure": trial.measure.model_dump()}
    metrics = dict(first.metrics)
    warnings = [w for w in first.details.get("warnings", []) if not is_timing_warning(w)]
    samples: dict[str, Any] = {}
    for key in first.details.get("latency_samples", {}):
        rounds = _pooled([r.details["latency_samples"][key] for r in passes])
        found, said = batch_metrics(int(key.removeprefix("b")), rounds)
        metrics.update(found)
        warnings += said
        samples[key] = rounds
    details = {**first.details, "latency_samples": samples, "passes": len(passes)}
    if warnings:
        details["warnings"] = warnings
    else:
        details.pop("warnings", None)
    return replace(first, metrics=metrics, details=details, params=params)


def _pooled(buckets: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of every pass in one bucket; each pass's repeats keep labels of their own."""
    pooled: dict[str, Any] = {}
    offsets = dict.fromkeys(_REPEAT_LABELS, 0)
    for bucket in buckets:
        for name, values in bucket.items():
            if name in offsets:
                values = [v + offsets[name] for v in values]
            pooled.setdefault(name, []).extend(values)
        for name in offsets:
            if bucket.get(name):
                offsets[name] += max(bucket[name]) + 1
    return pooled
