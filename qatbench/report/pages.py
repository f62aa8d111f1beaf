"""Self-contained HTML pages of ``compare`` and ``history`` (inline CSS, JS and SVG).

As for ``report.html``: the view functions compute plain data and geometry, the templates
(``compare.html.j2``, ``history.html.j2``) only draw it, autoescaped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qatbench.report.compare import (
    CompareResult,
    MetricChange,
    better_direction,
    fmt_change,
    fmt_value,
)
from qatbench.report.history import History, Point, Series
from qatbench.report.html import render_template
from qatbench.report.html_format import run_link
from qatbench.report.svg import Scale, auto_scale
from qatbench.results import write_text_atomic

HIST_W, HIST_H = 640, 230
HIST_MARGIN = {"left": 64, "right": 16, "top": 14, "bottom": 44}
MAX_X_LABELS = 8


def _tone(change: MetricChange) -> str:
    """``good``/``bad`` for a meaningful move of a metric whose better direction is known."""
    rel, good = change.relative, better_direction(change.metric)
    if rel is None or rel == 0 or not good:
        return ""
    if change.test is not None and not change.test.significant:
        return ""
    return "good" if (rel > 0) == (good > 0) else "bad"


def compare_view(result: CompareResult) -> dict[str, Any]:
    """Rows of every shown metric change, the breaches and the unpaired trials."""
    rows = []
    for trial in result.trials:
        for c in trial.changes:
            rows.append(
                {
                    "trial": c.trial,
                    "metric": c.metric,
                    "a": fmt_value(c.a),
                    "a_value": "" if c.a is None else repr(c.a),
                    "b": fmt_value(c.b),
                    "b_value": "" if c.b is None else repr(c.b),
                    "change": fmt_change(c),
                    "change_value": ""
                    if c.relative is None or math.isinf(c.relative)
                    else repr(c.relative),
                    "tone": _tone(c),
                    "p": "" if c.test is None else f"{c.test.p_value:.2g}",
                    "p_value": "" if c.test is None else repr(c.test.p_value),
                    "effect": "" if c.test is None else f"{c.test.effect:+.2f}",
                    "gates": ", ".join(g.text for g in c.gates),
                    "verdict": c.verdict,
                }
            )
    return {
        "a": result.a_label,
        "b": result.b_label,
        "ok": result.ok,
        "breaches": result.breaches,
        "gates": [g.text for g in result.gates],
        "alpha": f"{result.alpha:g}",
        "min_effect": f"{result.min_effect:.0%}",
        "rows": rows,
        "trials": len(result.trials),
        "only_a": list(result.only_a),
        "only_b": list(result.only_b),
        "notes": list(result.notes),
    }


def _x_ticks(hist: History, sx: Scale) -> list[dict[str, Any]]:
    """Every ``step``-th sweep, the last sweep in place of the regular tick before it (closer
    than ``step``, the two labels would overlap)."""
    last = len(hist.sweeps) - 1
    step = max(1, math.ceil(len(hist.sweeps) / MAX_X_LABELS))
    shown = list(range(0, last + 1, step))
    shown[-1] = last  # with more than MAX_X_LABELS sweeps, shown has two ticks or more
    return [{"pos": sx(i), "label": hist.sweeps[i][1][5:16].replace("T", " ")} for i in shown]


def _point_title(hist: History, series: Series, point: Point) -> str:
    sweep_id, started = hist.sweeps[point.sweep]
    lines = [f"{series.trial}", f"{sweep_id} · {started}", f"{hist.metric} {point.value:.4g}"]
    if point.change is not None:
        evidence = (
            f"Mann-Whitney p={point.test.p_value:.2g}, median ratio {point.test.ratio:.3f}"
            if point.test is not None
            else f"threshold {hist.threshold:.0%}"
        )
        verdict = "significant change" if point.direction else "no significant change"
        lines.append(f"{point.change:+.1%} vs previous · {verdict} ({evidence})")
    if point.run_id:
        lines.append(f"MLflow run {point.run_id}")
    return "\n".join(lines)


def _series_chart(
    hist: History, series: Series, tracking: dict[str, Any], index: int
) -> dict[str, Any]:
    m = HIST_MARGIN
    sx = Scale(-0.5, len(hist.sweeps) - 0.5, m["left"], HIST_W - m["right"])
    sy = _shared_y(hist)
    good = better_direction(hist.metric)
    steps = [
        {
            "x": sx(at - 0.5),
            "label": f"step {step.change:+.1%}",
            # the label reads away from the chart's nearer edge
            "anchor": "end" if at > len(hist.sweeps) / 2 else "start",
            "tone": "good" if good and (step.change > 0) == (good > 0) else "bad" if good else "",
            "title": f"{series.trial}: level {step.before:.4g} -> {step.after:.4g} "
            f"({step.change:+.1%}) from sweep {hist.sweeps[at][0]}",
        }
        for step, at in zip(series.steps, series.step_sweeps(), strict=True)
    ]
    marks = []
    for p in series.points:
        tone = "" if not p.direction else "good" if p.direction == good else "bad" if good else ""
        marks.append(
            {
                "cx": sx(p.sweep),
                "cy": sy(p.value),
                "y_low": None if p.low is None else sy(p.low),
                "y_high": None if p.high is None else sy(p.high),
                "changed": bool(p.direction),
                "up": p.direction > 0,
                "tone": tone,
                "link": run_link(tracking, p.run_id),
                "title": _point_title(hist, series, p),
            }
        )
    return {
        "id": f"series-{index}",
        "trial": series.trial,
        "width": HIST_W,
        "height": HIST_H,
        "margin": m,
        "x_ticks": _x_ticks(hist, sx),
        "y_ticks": sy.log_ticks(),
        "y_label": hist.metric + (" (log)" if sy.log else ""),
        "line": " ".join(f"{mk['cx']},{mk['cy']}" for mk in marks),
        "marks": marks,
        "steps": steps,
        "changes": sum(mk["changed"] for mk in marks),
    }


def _shared_y(hist: History) -> Scale:
    """One y scale for every trial's chart of the metric (values and intervals), so that
    levels compare across charts at a glance."""
    m = HIST_MARGIN
    values = [
        v
        for s in hist.series
        for p in s.points
        for v in (p.value, p.low, p.high)
        if v is not None and math.isfinite(v)
    ]
    return auto_scale(values, HIST_H - m["bottom"], m["top"])


def history_view(hist: History, tracking: dict[str, Any]) -> dict[str, Any]:
    """One chart per trial, and the table of significant changes."""
    changes = []
    for series in hist.series:
        for i, p in enumerate(series.points):
            if not p.direction:
                continue
            sweep_id, started = hist.sweeps[p.sweep]
            changes.append(
                {
                    "trial": series.trial,
                    "sweep": sweep_id,
                    "started": started,
                    "before": fmt_value(series.points[i - 1].value),
                    "after": fmt_value(p.value),
                    "change": "-" if p.change is None else f"{p.change:+.1%}",
                    "change_value": ""
                    if p.change is None or math.isinf(p.change)
                    else repr(p.change),
                    "evidence": f"p={p.test.p_value:.2g}"
                    if p.test is not None
                    else f"> {hist.threshold:.0%}",
                    "run_id": p.run_id or "",
                    "run_link": run_link(tracking, p.run_id),
                }
            )
    return {
        "experiment": hist.experiment,
        "metric": hist.metric,
        "sweeps": len(hist.sweeps),
        "first": hist.sweeps[0][1] if hist.sweeps else "",
        "last": hist.sweeps[-1][1] if hist.sweeps else "",
        "threshold": f"{hist.threshold:.0%}",
        "alpha": f"{hist.alpha:g}",
        "min_effect": f"{hist.min_effect:.0%}",
        "tracking_uri": str(tracking.get("uri") or ""),
        "charts": [_series_chart(hist, s, tracking, i) for i, s in enumerate(hist.series)],
        "changes": changes,
    }


def write_compare_html(result: CompareResult, path: Path) -> Path:
    write_text_atomic(path, render_template("compare.html.j2", view=compare_view(result)))
    return Path(path)


def write_history_html(hist: History, path: Path, tracking: dict[str, Any]) -> Path:
    """``tracking`` holds ``uri`` and ``experiment_id``: run links when it is a server."""
    view = history_view(hist, tracking)
    write_text_atomic(path, render_template("history.html.j2", view=view))
    return Path(path)
