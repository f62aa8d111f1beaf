"""The scatter charts of ``report.html`` and the styles every chart of the page shares.

:class:`Page` gives each (method, bits) a colour of ``PALETTE`` (the fp32 baseline grey) and
each runtime a marker, and keeps the table rows' anchors and the tracking store the charts
link to; :func:`scatter_chart` turns a model's trials into the geometry of one chart of mse
(log) against a metric, with error bars and the Pareto frontier of :func:`pareto_front`,
which ``chart.svg.j2`` only draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from qatbench.report.distributions import Styling
from qatbench.report.html_format import (
    BASELINE_METHOD,
    BASELINE_RUNTIME,
    finite_metric,
    run_link,
    trial_label,
)
from qatbench.report.svg import Scale, linear_domain, log_domain
from qatbench.results import RunRecord, TrialResult

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#59a14f",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#9c755f",
    "#ff9da7",
)
BASELINE_COLOR = "#8c8c8c"
CHART_W, CHART_H = 460, 280
CHART_MARGIN = {"left": 60, "right": 16, "top": 14, "bottom": 42}
OVERLAP_PX = 4.0  # marks closer than this on both axes would hide each other
SPREAD_PX = 6.0  # ... and are drawn on a ring of this radius around their point


def pareto_front(points: Iterable[tuple[str, float, float]]) -> list[str]:
    """Ids of the points ``(id, x, error)`` not dominated when maximising x and minimising error.

    A point is dominated by another that is at least as good on both and better on one.
    """
    pts = list(points)
    return [
        pid
        for pid, x, err in pts
        if not any(ox >= x and oe <= err and (ox > x or oe < err) for _, ox, oe in pts)
    ]


def front_points(trials: list[TrialResult], x_metric: str) -> list[tuple[str, float, float]]:
    """``(id, x, mse)`` of every trial that reports both finitely."""
    return [
        (t.id, x, e)
        for t in trials
        if (x := finite_metric(t, x_metric)) is not None
        and (e := finite_metric(t, "mse")) is not None
    ]


@dataclass(frozen=True)
class Page:
    """What every part of the page shares: row anchors, marker styles and the tracking store."""

    anchors: dict[str, str]  # trial id -> HTML id of its table row
    colors: dict[tuple[str, str], str]  # (method, bits) -> colour
    markers: dict[str, str]  # runtime -> "fill" or "ring"
    tracking: dict[str, Any]

    @classmethod
    def of(cls, record: RunRecord) -> Page:
        """Styles stable across the whole page: the baseline grey, runtime torch filled."""
        combos = sorted({(t.method, t.bits) for t in record.trials if t.method != BASELINE_METHOD})
        colors = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(combos)}
        colors.update(
            {
                (t.method, t.bits): BASELINE_COLOR
                for t in record.trials
                if t.method == BASELINE_METHOD
            }
        )
        runtimes = sorted(
            {t.runtime for t in record.trials}, key=lambda r: (r != BASELINE_RUNTIME, r)
        )
        return cls(
            anchors={t.id: f"trial-{i}" for i, t in enumerate(record.trials)},
            colors=colors,
            tracking=record.tracking,
            markers={r: "ring" if i else "fill" for i, r in enumerate(runtimes)},
        )

    def styling(self) -> Styling:
        """How the detail charts of :mod:`qatbench.report.distributions` draw a trial."""
        return Styling(
            color=lambda t: self.colors[(t.method, t.bits)],
            anchor=lambda t: self.anchors[t.id],
            link=lambda t: run_link(self.tracking, t.mlflow_run_id),
            label=trial_label,
        )


def _error_bars(
    trials: list[TrialResult], ci: tuple[str, str] | None
) -> dict[str, tuple[float, float]]:
    """Trial id -> (low, high) of the interval metrics ``ci`` where a trial reports both."""
    if ci is None:
        return {}
    return {
        t.id: (lo, hi)
        for t in trials
        if (lo := finite_metric(t, ci[0])) is not None
        and (hi := finite_metric(t, ci[1])) is not None
    }


def spread_overlaps(marks: list[dict[str, Any]]) -> None:
    """Move marks that would hide each other (within :data:`OVERLAP_PX`) onto a small ring
    around their common point, each keeping its own title, which then names the overlap.

    The ring is a drawing aid only: the marks' data stay in their titles and the table."""
    groups: list[list[dict[str, Any]]] = []
    for mark in marks:
        for group in groups:
            if (
                abs(group[0]["cx"] - mark["cx"]) < OVERLAP_PX
                and abs(group[0]["cy"] - mark["cy"]) < OVERLAP_PX
            ):
                group.append(mark)
                break
        else:
            groups.append([mark])
    for group in groups:
        if len(group) < 2:
            continue
        cx, cy = group[0]["cx"], group[0]["cy"]
        for i, mark in enumerate(group):
            angle = 2 * math.pi * i / len(group) - math.pi / 2
            dx, dy = SPREAD_PX * math.cos(angle), SPREAD_PX * math.sin(angle)
            mark["cx"], mark["cy"] = round(cx + dx, 1), round(cy + dy, 1)
            if mark["bar"]:
                mark["bar"] = {k: round(v + dx, 1) for k, v in mark["bar"].items()}
            mark["title"] += f"\n(one of {len(group)} trials at the same point: spread apart)"


def scatter_chart(
    trials: list[TrialResult],
    x_metric: str,
    x_label: str,
    page: Page,
    ci: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Geometry of one scatter chart, mse (log) against ``x_metric``, with its Pareto frontier.

    ``ci`` names the metrics of a horizontal error bar (low, high) drawn around each point.
    """
    title = f"mse vs {x_label}"
    points = front_points(trials, x_metric)
    if not points:
        return {"title": title, "empty": f"no finished trial reports both mse and {x_metric}"}
    by_id = {t.id: t for t in trials}
    bars = _error_bars([by_id[pid] for pid, _, _ in points], ci)
    m = CHART_MARGIN
    xs = [x for _, x, _ in points] + [v for bar in bars.values() for v in bar] + [1.0]
    sx = Scale(*linear_domain(xs), m["left"], CHART_W - m["right"])
    sy = Scale(*log_domain([e for _, _, e in points]), CHART_H - m["bottom"], m["top"], log=True)
    front = set(pareto_front(points))
    marks: list[dict[str, Any]] = []
    for pid, x, err in points:
        t, bar = by_id[pid], bars.get(pid)
        ci_text = f" [{bar[0]:.2f}, {bar[1]:.2f}]" if bar else ""
        marks.append(
            {
                "cx": sx(x),
                "cy": sy(err),
                "color": page.colors[(t.method, t.bits)],
                "marker": page.markers[t.runtime],
                "front": pid in front,
                "anchor": page.anchors[pid],
                "bar": {"x1": sx(bar[0]), "x2": sx(bar[1])} if bar else None,
                "floor": sy.below(err),
                "title": f"{pid}\n{trial_label(t)}\nmse {err:.3g} · {x_label} {x:.3g}{ci_text}",
            }
        )
    spread_overlaps(marks)
    frontier = sorted((mk for mk in marks if mk["front"]), key=lambda mk: mk["cx"])
    return {
        "title": title,
        "empty": "",
        "width": CHART_W,
        "height": CHART_H,
        "margin": m,
        "x_label": x_label,
        "x_ticks": sx.ticks(),
        "y_ticks": sy.ticks(),
        "marks": marks,
        "frontier": " ".join(f"{mk['cx']},{mk['cy']}" for mk in frontier),
        "ref_x": sx(1.0),
        "note": f"mse below 1e{round(sy.lo)} (or 0) is drawn on the bottom axis"
        if any(mk["floor"] for mk in marks)
        else "",
    }
