"""Compare two runs trial by trial and check gates: data in, a :class:`CompareResult` out.

A gate ``METRIC:CHANGE`` names a metric and the change that breaches it:

- ``latency_p50_ms_b1:+5%`` an increase of more than 5% relative to A;
- ``throughput_per_s:-5%`` a decrease of more than 5% (a name without ``_bN`` covers every
  batch size; ``*`` and ``?`` glob, e.g. ``latency_p9?_ms_b*:+10%``);
- ``accuracy:-0.5`` an absolute drop of more than 0.5 (in the metric's own unit);
- ``speedup_vs_fp32:auto`` a change for the worse beyond each trial's own threshold, taken
  from its spread over the experiment's last sweeps (:mod:`qatbench.report.auto_gate`); the
  breach line names the threshold and where it came from.

Timing metrics (``latency_*``, ``fp32_latency_*``, ``throughput_*``, ``speedup_*``) are not
judged on a bare percentage: a gate on one is breached only when the recorded value moves
past the threshold AND the samples of the two runs (``details["latency_samples"]``) differ
significantly by the Mann-Whitney U test of :mod:`qatbench.measure.stats`, in the same
direction: one value per repeat when both runs timed enough repeats (rounds of one repeat
move together when the machine is busy), else the per-call rounds; the samples are those of
:mod:`qatbench.report.compare_samples`. Without samples on both sides the threshold alone
decides and the change says so. A trial that finished in A and failed in B is a breach;
trials present on one side only are listed, not judged. Rendering (a terminal table, an
HTML page) lives in :mod:`qatbench.report.text` and :mod:`qatbench.report.pages`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from qatbench.errors import ConfigError
from qatbench.measure.directions import better_direction as better_direction  # re-exported
from qatbench.measure.stats import ShiftTest, mann_whitney
from qatbench.report.compare_samples import (
    GENERATION_METRIC,
    SPREAD_METRIC,
    TIMING_METRIC,
    comparable_samples,
)
from qatbench.results import RunRecord, TrialResult

if TYPE_CHECKING:
    from qatbench.report.auto_gate import AutoThresholds

DEFAULT_ALPHA = 0.01
DEFAULT_MIN_EFFECT = 0.05
# Shown for every paired trial even without a gate; "_b*" families expand per batch size.
DEFAULT_METRICS = (
    "size_bytes",
    "latency_p50_ms_b*",
    "speedup_vs_fp32_b*",
    "mse",
    "accuracy",
    "perplexity",
    "next_token_accuracy",
    "decode_tokens_per_s",
)
_GATE = re.compile(
    r"^(?P<metric>[^:]+):(?P<sign>[+-])(?P<number>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)(?P<pct>%?)$"
)
_BATCH_SUFFIX = re.compile(r"_b\d+$")
Verdict = Literal["breach", "noise", "held", "missing", "info"]


@dataclass(frozen=True)
class Gate:
    """A limit on the change of every metric it matches, from A to B.

    ``sign`` +1: a rise beyond ``limit`` breaches, -1: a fall; ``relative``: ``limit`` is a
    fraction of A's value (``+5%`` is 0.05), else in the metric's unit. ``auto``: the limit
    is set per trial by :meth:`resolved` (``METRIC:auto``); until then it is NaN.
    """

    metric: str
    sign: int
    limit: float
    relative: bool
    text: str
    auto: bool = False

    def resolved(self, limit: float, source: str) -> Gate:
        """This auto gate with a concrete relative limit, its text saying where it came from."""
        return replace(
            self,
            limit=limit,
            auto=False,
            text=f"{self.text} (threshold {self.sign * limit:+.1%}: {source})",
        )

    def matches(self, metric: str) -> bool:
        """The exact name, the name plus a batch suffix ``_bN``, or a glob pattern."""
        if metric == self.metric:
            return True
        if _BATCH_SUFFIX.sub("", metric) == self.metric and _BATCH_SUFFIX.search(metric):
            return True
        return any(c in self.metric for c in "*?[") and fnmatch.fnmatchcase(metric, self.metric)

    def change(self, a: float, b: float) -> float:
        """B against A in the gate's terms: relative (a fraction) or absolute."""
        return relative_change(a, b) if self.relative else b - a

    def exceeded(self, a: float, b: float) -> bool:
        """Whether the change goes past the limit in the gate's direction."""
        change = self.change(a, b)
        return not math.isnan(change) and self.sign * change > self.limit


def parse_gate(text: str) -> Gate:
    """``METRIC:+5%``, ``METRIC:-1%``, ``METRIC:+0.5``, ``METRIC:-0.5`` or ``METRIC:auto``
    (the direction for the worse, the limit from history); else a ConfigError."""
    metric, _, rest = text.strip().rpartition(":")
    if rest.strip().lower() == "auto":
        return _auto_gate(text, metric.strip())
    match = _GATE.match(text.strip())
    if match is None:
        raise ConfigError(
            f"--gate {text!r}: expected METRIC:CHANGE with a signed change, e.g. "
            "latency_p50_ms_b1:+5% (a rise of more than 5% breaches), throughput_per_s:-5% "
            "or accuracy:-0.5 (an absolute drop of more than 0.5)"
        )
    metric = match["metric"].strip()
    if not metric or any(c.isspace() for c in metric):
        raise ConfigError(f"--gate {text!r}: the metric name is empty or contains spaces")
    number = float(match["number"])
    relative = bool(match["pct"])
    if not math.isfinite(number):
        raise ConfigError(f"--gate {text!r}: the change must be a finite number")
    return Gate(
        metric=metric,
        sign=1 if match["sign"] == "+" else -1,
        limit=number / 100.0 if relative else number,
        relative=relative,
        text=text.strip(),
    )


def _auto_gate(text: str, metric: str) -> Gate:
    if not metric or any(c.isspace() for c in metric):
        raise ConfigError(f"--gate {text!r}: the metric name is empty or contains spaces")
    better = better_direction(metric.replace("*", "").replace("?", ""))
    if better == 0:
        raise ConfigError(
            f"--gate {text!r}: auto needs a metric whose better direction is known "
            "(latency_*, throughput_*, speedup_*, accuracy, mse, size_bytes, ...); "
            f"give a signed change instead, e.g. {metric}:+5%"
        )
    return Gate(metric, -better, math.nan, True, text.strip(), auto=True)


def parse_gates(texts: Iterable[str]) -> list[Gate]:
    return [parse_gate(t) for t in texts]


def relative_change(a: float, b: float) -> float:
    """(b - a) / |a|; from zero it is 0 when b is zero too, else infinite with b's sign."""
    if a != 0.0:
        return (b - a) / abs(a)
    return 0.0 if b == 0.0 else math.copysign(math.inf, b)


def is_timing(metric: str) -> bool:
    """Latency, throughput and speed-up metrics (judged with a shift test on samples)."""
    timing = TIMING_METRIC.match(metric) or GENERATION_METRIC.match(metric)
    return bool(timing) and not SPREAD_METRIC.match(metric)


@dataclass(frozen=True)
class MetricChange:
    """One metric of one paired trial: both values, the gates on it and the verdict.

    ``test`` is the shift test of B's samples against A's (timing metrics with samples on
    both sides); ``breached`` the gates it breaches. Verdicts: ``breach``; ``noise`` (past a
    timing gate's threshold but not a significant shift); ``held``; ``missing`` (gated but
    absent on a side); ``info`` (no gate, shown for context).
    """

    trial: str
    metric: str
    a: float | None
    b: float | None
    timing: bool
    gates: tuple[Gate, ...] = ()
    test: ShiftTest | None = None
    breached: tuple[Gate, ...] = ()
    verdict: Verdict = "info"

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def relative(self) -> float | None:
        return None if self.a is None or self.b is None else relative_change(self.a, self.b)


@dataclass(frozen=True)
class TrialChange:
    """One trial present in both runs: its status on each side and its metric changes."""

    id: str
    status_a: str
    status_b: str
    error_b: str = ""  # "phase: reason" when B failed
    changes: tuple[MetricChange, ...] = ()

    @property
    def newly_failed(self) -> bool:
        return self.status_a == "finished" and self.status_b != "finished"


@dataclass(frozen=True)
class CompareResult:
    """Everything ``compare`` found; ``breaches`` are one line each, ``ok`` sets the exit code."""

    a_label: str
    b_label: str
    gates: tuple[Gate, ...]
    alpha: float
    min_effect: float
    trials: tuple[TrialChange, ...] = ()
    only_a: tuple[str, ...] = ()
    only_b: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def breaches(self) -> list[str]:
        lines = []
        for trial in self.trials:
            if trial.newly_failed:
                lines.append(f"{trial.id}: finished in A but failed in B ({trial.error_b})")
            lines += [breach_line(c) for c in trial.changes if c.verdict == "breach"]
        return lines

    @property
    def ok(self) -> bool:
        return not self.breaches


def fmt_value(value: float | None) -> str:
    """Four significant digits, or a dash for a missing value."""
    return "-" if value is None else f"{value:.4g}"


def fmt_change(change: MetricChange) -> str:
    """``+20.1%`` (relative), ``-0.5`` (absolute for a zero A) or ``-`` when unknown."""
    rel, delta = change.relative, change.delta
    if rel is None or delta is None:
        return "-"
    if math.isinf(rel):
        return f"{delta:+.4g}"
    return f"{rel:+.1%}"


def breach_line(change: MetricChange) -> str:
    """``trial: metric a -> b (+20.1%, p=3e-09) breaches latency_p50_ms:+5%``."""
    test = f", p={change.test.p_value:.2g}" if change.test is not None else ""
    gates = ", ".join(g.text for g in change.breached)
    return (
        f"{change.trial}: {change.metric} {fmt_value(change.a)} -> {fmt_value(change.b)} "
        f"({fmt_change(change)}{test}) breaches {gates}"
    )


def _judge(
    trial_a: TrialResult,
    trial_b: TrialResult,
    metric: str,
    gates: tuple[Gate, ...],
    alpha: float,
    min_effect: float,
) -> MetricChange:
    a, b = _finite(trial_a, metric), _finite(trial_b, metric)
    timing = is_timing(metric)
    test, direction = None, 0
    if timing:
        sa, sb, move = comparable_samples(trial_a, trial_b, metric)
        if sa and sb:
            test = mann_whitney(sa, sb, alpha=alpha, min_effect=min_effect)
            shift = (test.ratio > 1.0) - (test.ratio < 1.0)
            direction = shift * move if test.significant else 0
    base = MetricChange(trial_a.id, metric, a, b, timing, gates, test)
    if not gates:
        return base
    if a is None or b is None:
        return replace(base, verdict="missing")
    exceeded = tuple(g for g in gates if g.exceeded(a, b))
    if test is not None:
        breached = tuple(g for g in exceeded if direction == g.sign)
        verdict: Verdict = "breach" if breached else "noise" if exceeded else "held"
    else:
        breached, verdict = exceeded, "breach" if exceeded else "held"
    return replace(base, breached=breached, verdict=verdict)


def _finite(trial: TrialResult, metric: str) -> float | None:
    value = trial.metrics.get(metric) if trial.ok else None
    return value if value is not None and math.isfinite(value) else None


def _metrics_of(trials: Sequence[TrialResult]) -> set[str]:
    return {m for t in trials for m in t.metrics}


def _shown(metrics: set[str], gates: Sequence[Gate], defaults: Sequence[str]) -> list[str]:
    """Gated metrics and the default ones present, defaults first in their order, then A-Z."""
    ordered: list[str] = []
    for pattern in defaults:
        ordered += sorted(m for m in metrics if fnmatch.fnmatchcase(m, pattern))
    gated = sorted(m for m in metrics if any(g.matches(m) for g in gates))
    return list(dict.fromkeys([*ordered, *gated]))


def compare(
    a: RunRecord,
    b: RunRecord,
    gates: Sequence[Gate] = (),
    *,
    alpha: float = DEFAULT_ALPHA,
    min_effect: float = DEFAULT_MIN_EFFECT,
    labels: tuple[str, str] = ("A", "B"),
    metrics: Sequence[str] = DEFAULT_METRICS,
    thresholds: AutoThresholds | None = None,
) -> CompareResult:
    """Pair the trials of ``a`` and ``b`` by id and judge every gate on every paired trial.

    ``metrics`` are glob patterns of what to show besides the gated metrics. A gate that
    matches no metric of either run is a :class:`ConfigError` (most likely a typo).
    ``thresholds`` set the limit of ``METRIC:auto`` gates per trial (without them, each
    trial's auto gates take :data:`qatbench.report.auto_gate.DEFAULT_LIMIT`).
    """
    if thresholds is None and any(g.auto for g in gates):
        from qatbench.report.auto_gate import AutoThresholds, fallback_threshold

        thresholds = AutoThresholds({}, fallback_threshold(None))
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"--alpha {alpha}: must lie strictly between 0 and 1")
    if min_effect < 0.0:
        raise ConfigError(f"--min-effect {min_effect}: must not be negative")
    present = _metrics_of(a.trials) | _metrics_of(b.trials)
    for gate in gates:
        if not any(gate.matches(m) for m in present):
            known = sorted({_BATCH_SUFFIX.sub("", m) for m in present})
            raise ConfigError(
                f"--gate {gate.text!r}: no trial of either run reports a metric {gate.metric!r}; "
                f"metrics reported: {', '.join(known) or '(none)'}"
            )
    by_id_b = {t.id: t for t in b.trials}
    ids_a = {t.id for t in a.trials}
    if (a.trials or b.trials) and not ids_a & by_id_b.keys():
        raise ConfigError(
            f"{labels[0]} and {labels[1]} have no trial id in common: nothing to compare "
            f"({len(ids_a)} and {len(by_id_b)} trials)"
        )
    paired: list[TrialChange] = []
    for ta in a.trials:
        tb = by_id_b.get(ta.id)
        if tb is None:
            continue
        shown = _shown(_metrics_of([ta, tb]), gates, metrics)
        changes = tuple(
            _judge(ta, tb, m, _gates_for(ta.id, m, gates, thresholds), alpha, min_effect)
            for m in shown
        )
        error_b = f"{tb.error.phase}: {tb.error.reason}" if tb.error else ""
        paired.append(TrialChange(ta.id, ta.status, tb.status, error_b, changes))
    return CompareResult(
        a_label=labels[0],
        b_label=labels[1],
        gates=tuple(gates),
        alpha=alpha,
        min_effect=min_effect,
        trials=tuple(paired),
        only_a=tuple(t.id for t in a.trials if t.id not in by_id_b),
        only_b=tuple(t.id for t in b.trials if t.id not in ids_a),
        notes=_notes(paired),
    )


def _gates_for(
    trial: str, metric: str, gates: Sequence[Gate], thresholds: AutoThresholds | None
) -> tuple[Gate, ...]:
    """The gates on one metric of one trial, auto ones with the trial's own limit."""
    matching = []
    for gate in gates:
        if not gate.matches(metric):
            continue
        if gate.auto and thresholds is not None:
            threshold = thresholds.get(trial, metric)
            gate = gate.resolved(threshold.limit, threshold.source)
        matching.append(gate)
    return tuple(matching)


def _notes(paired: Sequence[TrialChange]) -> tuple[str, ...]:
    """Caveats worth a line: timing gates decided without samples."""
    unsampled = sorted(
        {c.metric for t in paired for c in t.changes if c.timing and c.gates and c.test is None}
    )
    if not unsampled:
        return ()
    return (
        "no latency samples on both sides for "
        + ", ".join(unsampled)
        + ": judged on the threshold alone",
    )
