"""Detail charts of ``report.html``: latency distributions and the per-layer error.

Like :mod:`qatbench.report.html`, builders return plain geometry for the templates; they
read ``details["latency_samples"]`` (per-call ms of every timed round) and
``details["per_layer"]`` (one row per quantized layer, worst first) of finished trials.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qatbench.measure.stats import summarize
from qatbench.report.compare_samples import batch_samples
from qatbench.report.svg import Scale, auto_scale
from qatbench.results import TrialResult

DIST_W, DIST_LEFT, DIST_RIGHT, DIST_TOP, DIST_BOTTOM = 620, 170, 16, 10, 38
LABEL_CHARS = 25  # what DIST_LEFT holds at the charts' font size
ROW_H = 24
MAX_DOTS = 60  # quantiles of the samples drawn as dots per trial; the box uses every sample
WORST_TRIALS = 3
MAX_LAYERS = 10
LAYER_ROW_H = 20
_GOLDEN = 0.6180339887498949
LAYER_COLUMNS = (
    ("mse", "mse", "{:.3g}"),
    ("sqnr_db", "SQNR dB", "{:.1f}"),
    ("max_abs_error", "max |err|", "{:.3g}"),
    ("cosine", "cosine", "{:.5f}"),
)


@dataclass(frozen=True)
class Styling:
    """How the page draws a trial: its colour, its table row's anchor, its MLflow link."""

    color: Callable[[TrialResult], str]
    anchor: Callable[[TrialResult], str]
    link: Callable[[TrialResult], str]
    label: Callable[[TrialResult], str]


def fit_label(label: str, chars: int = LABEL_CHARS) -> str:
    """``label`` cut in the middle to ``chars`` (method and runtime both stay readable); the
    row's tooltip keeps the whole trial id."""
    if len(label) <= chars:
        return label
    head = (chars - 1) // 2
    return label[:head] + "\u2026" + label[-(chars - 1 - head) :]


def _quantile_dots(values: list[float], count: int = MAX_DOTS) -> list[float]:
    """At most ``count`` values at evenly spaced quantiles: the shape without every sample."""
    ordered = sorted(values)
    if len(ordered) <= count:
        return ordered
    return [
        ordered[min(len(ordered) - 1, int((i + 0.5) * len(ordered) / count))] for i in range(count)
    ]


def sample_batches(trials: list[TrialResult]) -> list[int]:
    """Batch sizes at which some finished trial recorded latency samples."""
    found: set[int] = set()
    for t in trials:
        bucket = t.details.get("latency_samples") if t.ok else None
        if isinstance(bucket, dict):
            found |= {int(k[1:]) for k in bucket if k[:1] == "b" and k[1:].isdigit()}
    return sorted(found)


def latency_chart(trials: list[TrialResult], batch: int, style: Styling) -> dict[str, Any]:
    """Box and strip plot of per-call latency at ``batch``, one row per trial, fastest first."""
    rows = []
    for t in trials:
        samples = batch_samples(t, batch) if t.ok else []
        if samples:
            rows.append((t, samples, summarize(samples)))
    rows.sort(key=lambda r: r[2].median)
    title = f"latency per call, batch {batch}"
    if not rows:
        return {"title": title, "empty": f"no finished trial recorded samples at batch {batch}"}
    whiskers = {}
    extent: list[float] = []
    for t, samples, s in rows:
        lo = min(v for v in samples if v >= s.q1 - 1.5 * s.iqr)
        hi = max(v for v in samples if v <= s.q3 + 1.5 * s.iqr)
        whiskers[t.id] = (lo, hi)
        extent += [lo, hi, *_quantile_dots(samples)]
    height = DIST_TOP + ROW_H * len(rows) + DIST_BOTTOM
    sx = auto_scale(extent, DIST_LEFT, DIST_W - DIST_RIGHT)
    marks = []
    for i, (t, samples, s) in enumerate(rows):
        y = DIST_TOP + ROW_H * i + ROW_H / 2
        lo, hi = whiskers[t.id]
        dots = _quantile_dots(samples)
        marks.append(
            {
                "y": y,
                "label": fit_label(style.label(t)),
                "anchor": style.anchor(t),
                "color": style.color(t),
                "q1": sx.clamped(s.q1),
                "q3": sx.clamped(s.q3),
                "median": sx.clamped(s.median),
                "lo": sx.clamped(lo),
                "hi": sx.clamped(hi),
                "dots": [
                    {"cx": sx.clamped(v), "cy": round(y + ((j * _GOLDEN) % 1 - 0.5) * 14, 1)}
                    for j, v in enumerate(dots)
                ],
                "title": (
                    f"{t.id}\n{s.n} rounds · median {s.median:.4g} ms "
                    f"[{s.median_ci_low:.4g}, {s.median_ci_high:.4g}]\n"
                    f"IQR {s.q1:.4g}-{s.q3:.4g} · p99 {s.p99:.4g} · cv {s.cv:.1%}"
                    + (" · unstable" if s.unstable else "")
                ),
            }
        )
    return {
        "title": title,
        "empty": "",
        "width": DIST_W,
        "height": height,
        "left": DIST_LEFT,
        "right": DIST_W - DIST_RIGHT,
        "top": DIST_TOP,
        "bottom": height - DIST_BOTTOM,
        "x_ticks": sx.log_ticks(),
        "x_label": "ms per call" + (" (log)" if sx.log else ""),
        "rows": marks,
    }


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _layer_rows(trial: TrialResult) -> list[dict[str, Any]]:
    rows = trial.details.get("per_layer")
    if not isinstance(rows, list):
        return []
    return [r for r in rows if isinstance(r, dict)][:MAX_LAYERS]


def _worst_sqnr(trial: TrialResult) -> float:
    recorded = _number(trial.metrics.get("worst_layer_sqnr_db"))
    if recorded is not None:
        return recorded
    values = [v for r in _layer_rows(trial) if (v := _number(r.get("sqnr_db"))) is not None]
    return min(values, default=math.inf)


def layer_views(trials: list[TrialResult], style: Styling) -> list[dict[str, Any]]:
    """The :data:`WORST_TRIALS` finished trials with the lowest per-layer SQNR: a bar chart of
    each layer's SQNR on one shared scale, and the rows as a table."""
    ranked = sorted((t for t in trials if t.ok and _layer_rows(t)), key=_worst_sqnr)
    worst = ranked[:WORST_TRIALS]
    sqnrs = [
        v for t in worst for r in _layer_rows(t) if (v := _number(r.get("sqnr_db"))) is not None
    ]
    if not worst:
        return []
    lo, hi = min([0.0, *sqnrs]), max([1.0, *sqnrs])
    sx = Scale(lo, hi * 1.15, DIST_LEFT, DIST_W - DIST_RIGHT)  # room for the value text
    views = []
    for t in worst:
        layers = _layer_rows(t)
        height = DIST_TOP + LAYER_ROW_H * len(layers) + DIST_BOTTOM
        bars = []
        for i, row in enumerate(layers):
            sqnr = _number(row.get("sqnr_db"))
            x0, x1 = sx(0.0), sx(sqnr) if sqnr is not None else sx(0.0)
            bars.append(
                {
                    "y": DIST_TOP + LAYER_ROW_H * i + 3,
                    "h": LAYER_ROW_H - 6,
                    "x": min(x0, x1),
                    "w": max(abs(x1 - x0), 1.0),
                    "label": str(row.get("layer", "?")),
                    "value": "—" if sqnr is None else f"{sqnr:.1f} dB",
                    "title": f"{row.get('layer', '?')} ({row.get('type', '?')})",
                }
            )
        views.append(
            {
                "id": t.id,
                "label": style.label(t),
                "anchor": style.anchor(t),
                "run_id": t.mlflow_run_id or "",
                "run_link": style.link(t),
                "color": style.color(t),
                "chart": {
                    "title": f"per-layer SQNR · {style.label(t)}",
                    "width": DIST_W,
                    "height": height,
                    "left": DIST_LEFT,
                    "right": DIST_W - DIST_RIGHT,
                    "top": DIST_TOP,
                    "bottom": height - DIST_BOTTOM,
                    "x_ticks": sx.ticks(),
                    "x_label": "SQNR dB (higher is better)",
                    "bars": bars,
                },
                "columns": [header for _, header, _ in LAYER_COLUMNS],
                "rows": [
                    {
                        "layer": str(row.get("layer", "?")),
                        "type": str(row.get("type", "")),
                        "cells": [
                            {
                                "text": "—" if v is None else fmt.format(v),
                                "value": "" if v is None else repr(v),
                            }
                            for key, _, fmt in LAYER_COLUMNS
                            for v in [_number(row.get(key))]
                        ],
                    }
                    for row in layers
                ],
            }
        )
    return views
