"""The pick: per model, runtime and batch size, the best finished trial within a quality budget.

Pure decision over results (no MLflow, no terminal). A :class:`Budget` maps quality metrics
to the worst value accepted, read in each metric's direction
(:func:`qatbench.measure.directions.better_direction`): ``accuracy_delta_vs_fp32: -1.0`` is a
lower bound, ``perplexity: 12`` an upper one. :func:`pick` then takes, in each group of
model x runtime x batch size, the trial best by the objective (``speedup``: the speed-up
against fp32 at that batch size, higher is better; ``size``: ``size_bytes``; ``peak_memory``:
``peak_rss_bytes``, lower is better) among the finished trials within budget.

Statistics are respected: for the speed-up each trial carries a confidence interval
(``speedup_ci_low_bN``/``speedup_ci_high_bN``). Every trial whose interval overlaps the
best one's is not significantly slower; among those the one of best quality (the budget's
metrics in their order, then ``sqnr_db``) is picked, and ``why`` says so. A group with no
trial within budget gets no pick but names the closest trial (the smallest shortfall
relative to each bound) and what it misses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from qatbench.errors import ConfigError
from qatbench.measure.directions import better_direction
from qatbench.results import RunRecord, TrialResult

PICK_BY = ("speedup", "size", "peak_memory")
_BATCH = re.compile(r"^speedup_vs_fp32_b(\d+)$")
_QUALITY_FALLBACK = "sqnr_db"  # orders ties when the budget names no metric


@dataclass(frozen=True)
class Bound:
    """One budget entry: ``metric`` must be at least (direction +1) or at most (-1) ``limit``."""

    metric: str
    limit: float
    direction: int

    def holds(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.limit if self.direction > 0 else value <= self.limit

    def shortfall(self, value: float | None) -> float:
        """How far ``value`` is on the wrong side, relative to the bound (0 when it holds)."""
        if value is None or not math.isfinite(value):
            return math.inf
        gap = max(0.0, self.direction * (self.limit - value))
        return gap / max(abs(self.limit), 1.0)

    @property
    def text(self) -> str:
        return f"{self.metric} {'>=' if self.direction > 0 else '<='} {self.limit:g}"


@dataclass(frozen=True)
class Budget:
    """The quality a user accepts: every bound must hold (an empty budget accepts all)."""

    bounds: tuple[Bound, ...] = ()

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, float], declared: Mapping[str, int] | None = None
    ) -> Budget:
        bounds = []
        for metric, limit in mapping.items():
            direction = better_direction(metric, declared)
            if direction == 0:
                raise ConfigError(
                    f"budget {metric}: the direction of this metric is not known "
                    "(higher or lower is better)"
                )
            bounds.append(Bound(metric, float(limit), direction))
        return cls(tuple(bounds))

    def misses(self, trial: TrialResult) -> list[str]:
        """The bounds ``trial`` does not meet, each with the value it has."""
        return self.misses_in(trial.metrics)

    def misses_in(self, metrics: Mapping[str, float]) -> list[str]:
        """The bounds ``metrics`` do not meet, each with the value they have."""
        out = []
        for b in self.bounds:
            value = metrics.get(b.metric)
            if not b.holds(value):
                shown = "not measured" if value is None else f"{value:.4g}"
                out.append(f"{b.text} ({shown})")
        return out

    def shortfall(self, trial: TrialResult) -> float:
        return self.shortfall_in(trial.metrics)

    def shortfall_in(self, metrics: Mapping[str, float]) -> float:
        """How far ``metrics`` fall short of the bounds, summed (0: within budget)."""
        return sum(b.shortfall(metrics.get(b.metric)) for b in self.bounds)


def parse_budget_args(texts: Iterable[str]) -> dict[str, float]:
    """``METRIC:VALUE`` strings of ``qatbench pick --budget`` as a mapping."""
    out: dict[str, float] = {}
    for text in texts:
        metric, sep, number = text.partition(":")
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not sep or not metric.strip() or not math.isfinite(value):
            raise ConfigError(
                f"--budget {text!r}: expected METRIC:VALUE with a finite number, e.g. "
                "accuracy_delta_vs_fp32:-1.0 or cosine:0.995"
            )
        out[metric.strip()] = value
    return out


@dataclass(frozen=True)
class Objective:
    """What is maximised or minimised at one batch size, with the metrics of its interval."""

    name: str
    metric: str
    direction: int
    ci: tuple[str, str] | None = None


def objective(by: str, batch_size: int) -> Objective:
    if by == "speedup":
        n = batch_size
        return Objective(
            by, f"speedup_vs_fp32_b{n}", 1, (f"speedup_ci_low_b{n}", f"speedup_ci_high_b{n}")
        )
    if by == "size":
        return Objective(by, "size_bytes", -1)
    if by == "peak_memory":
        return Objective(by, "peak_rss_bytes", -1)
    raise ConfigError(f"--by {by!r}: allowed: {', '.join(PICK_BY)}")


@dataclass(frozen=True)
class Pick:
    """The answer for one model x runtime x batch size; ``trial_id`` None: nothing in budget."""

    model: str
    runtime: str
    batch_size: int
    by: str
    metric: str
    trial_id: str | None
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    why: str = ""
    tied_with: tuple[str, ...] = ()  # not significantly different in the objective
    closest: str | None = None  # when nothing is within budget
    closest_misses: tuple[str, ...] = ()
    run_id: str | None = None  # the MLflow run of the picked trial

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tied_with"] = list(self.tied_with)
        out["closest_misses"] = list(self.closest_misses)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Pick:
        fields = dict(data)
        fields["tied_with"] = tuple(fields.get("tied_with", ()))
        fields["closest_misses"] = tuple(fields.get("closest_misses", ()))
        return cls(**fields)


def _value(trial: TrialResult, metric: str | None) -> float | None:
    if metric is None:
        return None
    value = trial.metrics.get(metric)
    return value if value is not None and math.isfinite(value) else None


def _interval(trial: TrialResult, obj: Objective) -> tuple[float, float] | None:
    if obj.ci is None:
        return None
    low, high = _value(trial, obj.ci[0]), _value(trial, obj.ci[1])
    return None if low is None or high is None else (low, high)


def _tied(best: TrialResult, other: TrialResult, obj: Objective) -> bool:
    """Not significantly different in the objective: the intervals overlap (without
    intervals, only equal values tie)."""
    a, b = _interval(best, obj), _interval(other, obj)
    if a is None or b is None:
        return _value(best, obj.metric) == _value(other, obj.metric)
    return a[0] <= b[1] and b[0] <= a[1]


def _quality_key(trial: TrialResult, budget: Budget) -> tuple[float, ...]:
    metrics = [(b.metric, b.direction) for b in budget.bounds]
    metrics.append((_QUALITY_FALLBACK, 1))
    key = []
    for metric, direction in metrics:
        value = _value(trial, metric)
        key.append(-math.inf if value is None else direction * value)
    return tuple(key)


def _fmt(value: float | None, obj: Objective) -> str:
    if value is None:
        return "n/a"
    if obj.name == "speedup":
        return f"{value:.2f}x"
    return f"{value / 1e6:.3g} MB" if value >= 1e5 else f"{value:.0f} bytes"


def batch_sizes(trials: Iterable[TrialResult]) -> list[int]:
    found = {int(m[1]) for t in trials for k in t.metrics if (m := _BATCH.match(k))}
    return sorted(found)


def pick(trials: Sequence[TrialResult], budget: Budget, by: str = "speedup") -> list[Pick]:
    """One :class:`Pick` per model x runtime x batch size (see the module docstring)."""
    finished = [t for t in trials if t.ok]
    groups: dict[tuple[str, str], list[TrialResult]] = {}
    for t in finished:
        groups.setdefault((t.model, t.runtime), []).append(t)
    picks = []
    for (model, runtime), members in sorted(groups.items()):
        for n in batch_sizes(members) or [0]:
            obj = objective(by, n)
            measured = [t for t in members if _value(t, obj.metric) is not None]
            if not measured:
                continue
            picks.append(_pick_group(model, runtime, n, measured, budget, obj))
    return picks


def _pick_group(
    model: str,
    runtime: str,
    n: int,
    measured: list[TrialResult],
    budget: Budget,
    obj: Objective,
) -> Pick:
    base: dict[str, Any] = {"model": model, "runtime": runtime, "batch_size": n, "by": obj.name}
    within = [t for t in measured if not budget.misses(t)]
    if not within:
        closest = min(measured, key=lambda t: (budget.shortfall(t), t.id))
        misses = tuple(budget.misses(closest))
        return Pick(
            **base,
            metric=obj.metric,
            trial_id=None,
            why=f"no trial within budget; closest: {closest.id}, misses {'; '.join(misses)}",
            closest=closest.id,
            closest_misses=misses,
        )

    def score(t: TrialResult) -> float:
        value = _value(t, obj.metric)
        return -math.inf if value is None else obj.direction * value

    ranked = sorted(within, key=lambda t: (-score(t), t.id))
    best = ranked[0]
    tied = [t for t in ranked[1:] if _tied(best, t, obj)]
    chosen = max([best, *tied], key=lambda t: _quality_key(t, budget))
    value = _value(chosen, obj.metric)
    interval = _interval(chosen, obj)
    shown = _fmt(value, obj)
    if interval:
        shown += f" [{_fmt(interval[0], obj)}, {_fmt(interval[1], obj)}]"
    budget_text = ", ".join(b.text for b in budget.bounds) or "no budget"
    why = f"best {obj.name} ({shown}) of {len(within)} of {len(measured)} trials within budget"
    why += f" ({budget_text})"
    others = [t.id for t in [best, *tied] if t is not chosen]
    if others:
        quality = budget.bounds[0].metric if budget.bounds else _QUALITY_FALLBACK
        why += (
            f"; not significantly different in {obj.name} from {', '.join(others)}: "
            f"picked for better quality ({quality})"
        )
    return Pick(
        **base,
        metric=obj.metric,
        trial_id=chosen.id,
        value=value,
        ci_low=interval[0] if interval else None,
        ci_high=interval[1] if interval else None,
        why=why,
        tied_with=tuple(others),
        run_id=chosen.mlflow_run_id,
    )


def record_budget(record: RunRecord) -> tuple[dict[str, float], str]:
    """The ``budget:`` and ``pick_by:`` of the experiment a report ran (empty, speedup if
    the report predates them)."""
    spec = record.experiment.get("spec") or {}
    return dict(spec.get("budget") or {}), str(spec.get("pick_by") or "speedup")


def picks_of_record(
    record: RunRecord,
    budget: Mapping[str, float] | None = None,
    by: str | None = None,
    declared: Mapping[str, int] | None = None,
) -> list[Pick]:
    """The picks over ``record``'s trials, with the experiment's budget and objective unless
    given."""
    own_budget, own_by = record_budget(record)
    chosen = Budget.from_mapping(own_budget if budget is None else budget, declared)
    return pick(record.trials, chosen, by or own_by)


def with_picks(record: RunRecord) -> RunRecord:
    """``record`` with its ``picks`` (report.json) computed from its trials."""
    from qatbench.data.tasks import task_directions

    declared = task_directions()
    for trial in record.trials:  # metrics of the experiment's own task, as its trials say
        for key, way in trial.details.get("metric_directions", {}).items():
            declared.setdefault(key, 1 if way == "higher" else -1)
    try:
        picks = picks_of_record(record, declared=declared)
    except ConfigError:  # a budget the spec validated cannot fail; an edited report may
        return record
    return replace(record, picks=tuple(p.to_dict() for p in picks))
