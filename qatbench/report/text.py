"""Terminal rendering of ``compare`` and ``history`` results as rich tables (no computation)."""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from qatbench.report.compare import (
    CompareResult,
    MetricChange,
    better_direction,
    fmt_change,
    fmt_value,
)
from qatbench.report.history import History

_VERDICT_STYLE = {
    "breach": "bold red",
    "noise": "yellow",
    "held": "green",
    "missing": "yellow",
    "info": "dim",
}


def _significance(change: MetricChange) -> str:
    """``p=3e-09 *`` (the star: a significant shift) or ``threshold`` for unsampled timings."""
    if change.test is None:
        return "threshold" if change.timing and change.gates else ""
    return f"p={change.test.p_value:.2g}" + (" *" if change.test.significant else "")


def _verdict(change: MetricChange) -> Text:
    words = {
        "breach": "BREACH " + ", ".join(g.text.split(":", 1)[1] for g in change.breached),
        "noise": "held (noise)",
        "held": "held",
        "missing": "missing",
        "info": "",
    }
    return Text(words[change.verdict], style=_VERDICT_STYLE[change.verdict])


def _change(change: MetricChange) -> Text:
    """The change, green when it is an improvement, red when a deterioration."""
    text, rel = fmt_change(change), change.relative
    good = better_direction(change.metric)
    if rel is None or rel == 0 or not good:
        return Text(text)
    meaningful = change.test.significant if change.test is not None else True
    style = ("green" if (rel > 0) == (good > 0) else "red") if meaningful else "dim"
    return Text(text, style=style)


def compare_table(result: CompareResult) -> Table:
    """Per paired trial a heading row, then one row per shown metric."""
    table = Table(
        "trial / metric",
        "A",
        "B",
        "change",
        "samples",
        "gate",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"A = {result.a_label}\nB = {result.b_label}",
        title_justify="left",
    )
    for trial in result.trials:
        status = (
            Text(f"failed in B: {trial.error_b}", style="bold red")
            if trial.newly_failed
            else Text("")
            if trial.status_a == trial.status_b
            else Text(f"{trial.status_a} -> {trial.status_b}", style="yellow")
        )
        table.add_row(Text(trial.id, style="bold"), "", "", "", "", status)
        for change in trial.changes:
            table.add_row(
                f"  {change.metric}",
                fmt_value(change.a),
                fmt_value(change.b),
                _change(change),
                _significance(change),
                _verdict(change),
            )
    return table


def compare_summary(result: CompareResult) -> list[str]:
    """Lines after the table: unpaired trials, caveats and the overall verdict."""
    lines = []
    if result.only_a:
        lines.append(f"only in {result.a_label}: {', '.join(result.only_a)}")
    if result.only_b:
        lines.append(f"only in {result.b_label}: {', '.join(result.only_b)}")
    lines += [f"note: {n}" for n in result.notes]
    gates = ", ".join(g.text for g in result.gates) or "none"
    verdict = "every gate held" if result.ok else f"{len(result.breaches)} breach(es)"
    lines.append(
        f"{len(result.trials)} trials compared; gates: {gates}; "
        f"timing: Mann-Whitney U on the samples, * = p < {result.alpha:g} and a median shift "
        f">= {result.min_effect:.0%}; {verdict}"
    )
    return lines


def history_table(hist: History) -> Table:
    """The points where the metric changed significantly, one row each."""
    table = Table(
        "sweep",
        "started",
        "trial",
        "before",
        "after",
        "change",
        "evidence",
        title=f"{hist.experiment}: {hist.metric}, significant changes",
        title_justify="left",
    )
    good = better_direction(hist.metric)
    for series in hist.series:
        for point in series.changes:
            sweep_id, started = hist.sweeps[point.sweep]
            before = series.points[series.points.index(point) - 1].value
            evidence = (
                f"p={point.test.p_value:.2g}"
                if point.test is not None
                else f"> {hist.threshold:.0%}"
            )
            style = "" if not good else "green" if point.direction == good else "red"
            change = "-" if point.change is None else f"{point.change:+.1%}"
            table.add_row(
                sweep_id,
                started,
                series.trial,
                fmt_value(before),
                fmt_value(point.value),
                Text(change, style=style),
                evidence,
            )
    return table
