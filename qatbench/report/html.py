"""``report.html``: one self-contained page (inline CSS, JS and SVG) rendered from a RunRecord.

Compute and render apart: :func:`build_view` turns the record into plain dicts, lists,
strings and numbers (best methods, Pareto sets, formatted cells, chart geometry); the
Jinja2 template only loops over that view. Autoescaping is on, so every string that comes
from the record (model names, failure reasons, environment values) reaches the page escaped.
Nothing is invented: a metric a trial did not report is shown as missing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from qatbench.report.distributions import Styling, latency_chart, layer_views, sample_batches
from qatbench.report.flags import parity_flag, trial_flags
from qatbench.report.svg import Scale, linear_domain, log_domain
from qatbench.results import RunRecord, TrialResult, write_text_atomic

TEMPLATES = Path(__file__).parent / "templates"
BASELINE_METHOD, BASELINE_RUNTIME = "fp32", "torch"  # a model's reference trial
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
_BATCH_METRIC = re.compile(r"^(?:latency_p50_ms|throughput_per_s|speedup_vs_fp32)_b(\d+)$")

# Table columns as (metric, header, format kind); "{n}" stands for a batch size.
_HEAD_COLUMNS = (
    ("size_bytes", "size", "bytes"),
    ("compression_ratio", "compression", "ratio"),
    ("weight_bytes", "weights", "bytes"),
)
_BATCH_COLUMNS = (
    ("latency_p50_ms_b{n}", "p50 ms b{n}", "num"),
    ("throughput_per_s_b{n}", "samples/s b{n}", "num"),
    ("speedup_vs_fp32_b{n}", "speed-up b{n}", "ratio"),
)
_TAIL_COLUMNS = (
    ("peak_rss_bytes", "peak RSS", "bytes"),
    ("mse", "mse", "sci"),
    ("max_abs_error", "max |err|", "sci"),
    ("sqnr_db", "SQNR dB", "db"),
    ("cosine", "cosine", "cos"),
    ("accuracy", "accuracy", "acc"),
    # language models (text data): quality, then generation at batch 1
    ("perplexity", "perplexity", "num"),
    ("perplexity_delta_vs_fp32", "Δ ppl", "delta"),
    ("next_token_accuracy", "next-token acc %", "pct_points"),
    ("prefill_latency_p50_ms", "prefill ms", "num"),
    ("decode_tokens_per_s", "decode tok/s", "num"),
    ("kv_cache_bytes", "KV cache", "bytes"),
    ("onnx_size_bytes", "ONNX size", "bytes"),
    ("onnx_parity_max_abs", "ONNX parity", "sci"),
    ("int_op_fraction", "int ops", "pct"),
)


def _fmt_bytes(value: float) -> str:
    """Bytes in binary units to three digits: ``512 B``, ``12.0 KiB``, ``1.50 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            decimals = 0 if unit == "B" or abs(value) >= 100 else 1 if abs(value) >= 10 else 2
            return f"{value:.{decimals}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable: the loop returns at GiB")


def _fmt_num(value: float) -> str:
    """Three significant digits, thousands grouped instead of an exponent above 1000."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


FORMATS: dict[str, Callable[[float], str]] = {
    "bytes": _fmt_bytes,
    "num": _fmt_num,
    "ratio": lambda v: f"{v:.2f}\u00d7",  # multiplication sign
    "sci": lambda v: "0" if v == 0 else f"{v:.2e}",
    "db": lambda v: f"{v:.1f}",
    "cos": lambda v: f"{v:.5f}",
    "acc": lambda v: f"{v:.4f}",
    "pct": lambda v: f"{v:.0%}",
    "pct_points": lambda v: f"{v:.2f}",  # already in percent
    "delta": lambda v: f"{v:+.4f}",
}
# Cells whose second line is the change against the fp32 baseline.
_DELTA_NOTES = frozenset({"size_bytes", "accuracy", "next_token_accuracy"})  # ppl: own column


def _metric(trial: TrialResult, name: str) -> float | None:
    """A finite metric of a finished trial, else None (missing, NaN or infinite)."""
    value = trial.metrics.get(name)
    return value if trial.ok and value is not None and math.isfinite(value) else None


def method_label(trial: TrialResult) -> str:
    """``ptq w8a8``; the bit-width is left out where it repeats the method (``fp32``)."""
    return trial.method if trial.bits == trial.method else f"{trial.method} {trial.bits}"


def trial_label(trial: TrialResult) -> str:
    """``ptq w8a8 · onnxruntime``."""
    return f"{method_label(trial)} · {trial.runtime}"


def batch_sizes(trials: Iterable[TrialResult]) -> list[int]:
    """Batch sizes N named by ``latency_p50_ms_bN``/``throughput_per_s_bN``/``speedup_..._bN``."""
    found = {int(m[1]) for t in trials for name in t.metrics if (m := _BATCH_METRIC.match(name))}
    return sorted(found)


def find_baseline(trials: Iterable[TrialResult]) -> TrialResult | None:
    """The model's fp32 reference: method ``fp32`` on runtime ``torch``, if it finished."""
    return next(
        (
            t
            for t in trials
            if t.ok and t.method == BASELINE_METHOD and t.runtime == BASELINE_RUNTIME
        ),
        None,
    )


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


def _front_points(trials: list[TrialResult], x_metric: str) -> list[tuple[str, float, float]]:
    """``(id, x, mse)`` of every trial that reports both finitely."""
    return [
        (t.id, x, e)
        for t in trials
        if (x := _metric(t, x_metric)) is not None and (e := _metric(t, "mse")) is not None
    ]


def best_trial(
    trials: Iterable[TrialResult], metric: str, lowest: bool = False, kind: str = "ratio"
) -> dict[str, Any] | None:
    """The trial with the highest (or lowest) finite ``metric``: label, id and formatted value."""
    scored = [(v, t) for t in trials if (v := _metric(t, metric)) is not None]
    if not scored:
        return None
    value, trial = (min if lowest else max)(scored, key=lambda pair: pair[0])
    return {
        "label": trial_label(trial),
        "id": trial.id,
        "metric": metric,
        "text": FORMATS[kind](value),
    }


def _columns(trials: list[TrialResult]) -> list[dict[str, str]]:
    """The canonical metric columns that at least one of ``trials`` reports, in a fixed order."""
    batched = [
        (m.format(n=n), h.format(n=n), k) for n in batch_sizes(trials) for m, h, k in _BATCH_COLUMNS
    ]
    present = {name for t in trials for name in t.metrics}
    return [
        {"metric": m, "header": h, "kind": k}
        for m, h, k in (*_HEAD_COLUMNS, *batched, *_TAIL_COLUMNS)
        if m in present
    ]


def _delta_note(trial: TrialResult, metric: str, baseline: TrialResult | None) -> str:
    """Size and task-quality change against the fp32 baseline, as the cell's second line."""
    value = _metric(trial, metric)
    base = _metric(baseline, metric) if baseline is not None else None
    if value is None or baseline is None or trial.id == baseline.id:
        return ""
    if metric == "size_bytes":
        return f"{value / base - 1:+.1%} vs fp32" if base else ""
    recorded = _metric(trial, f"{metric}_delta_vs_fp32")
    delta = recorded if recorded is not None else (value - base if base is not None else None)
    return "" if delta is None else f"Δ {delta:+.4f}"


def _ci_note(trial: TrialResult, metric: str) -> str:
    """``[low, high]`` of a speed-up's 95% interval when the trial reports both ends."""
    n = metric.rsplit("_b", 1)[1]
    low, high = _metric(trial, f"speedup_ci_low_b{n}"), _metric(trial, f"speedup_ci_high_b{n}")
    return f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""


def _cell(
    trial: TrialResult, column: dict[str, str], baseline: TrialResult | None
) -> dict[str, str]:
    """One table cell: display text, sortable value (empty when missing) and a note line."""
    metric = column["metric"]
    raw = trial.metrics.get(metric)
    flag = "bad" if metric == "onnx_parity_max_abs" and parity_flag(trial) else ""
    if raw is None:
        return {"text": "—", "value": "", "note": "", "flag": ""}
    if not math.isfinite(raw):
        return {"text": str(raw), "value": "", "note": "", "flag": flag}
    if metric.startswith("speedup_vs_fp32_b"):
        note = _ci_note(trial, metric)
    elif metric in _DELTA_NOTES:
        note = _delta_note(trial, metric, baseline)
    else:
        note = "mismatch" if flag else ""
    return {"text": FORMATS[column["kind"]](raw), "value": repr(raw), "note": note, "flag": flag}


def run_link(tracking: dict[str, Any], run_id: str | None) -> str:
    """MLflow UI address of a run when the tracking URI is an http(s) server, else ``""``."""
    uri, experiment_id = str(tracking.get("uri") or ""), tracking.get("experiment_id")
    if not run_id or experiment_id is None or urlparse(uri).scheme not in ("http", "https"):
        return ""
    return f"{uri.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}"


def _tracking_view(tracking: dict[str, Any]) -> dict[str, str]:
    """Where the runs are: the URI, the experiment (a link on a server) and how to browse."""
    uri, experiment_id = _text(tracking.get("uri")), _text(tracking.get("experiment_id"))
    served = urlparse(uri).scheme in ("http", "https")
    link = (
        f"{uri.rstrip('/')}/#/experiments/{quote(experiment_id)}"
        if served and experiment_id
        else ""
    )
    browse = "" if served or not uri else f"mlflow ui --backend-store-uri {uri} --workers 1"
    return {"uri": uri, "experiment_id": experiment_id, "link": link, "browse": browse}


@dataclass(frozen=True)
class _Page:
    """What every part of the page shares: row anchors, marker styles and the tracking store."""

    anchors: dict[str, str]  # trial id -> HTML id of its table row
    colors: dict[tuple[str, str], str]  # (method, bits) -> colour
    markers: dict[str, str]  # runtime -> "fill" or "ring"
    tracking: dict[str, Any]

    @classmethod
    def of(cls, record: RunRecord) -> _Page:
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
        if (lo := _metric(t, ci[0])) is not None and (hi := _metric(t, ci[1])) is not None
    }


def _chart(
    trials: list[TrialResult],
    x_metric: str,
    x_label: str,
    page: _Page,
    ci: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Geometry of one scatter chart, mse (log) against ``x_metric``, with its Pareto frontier.

    ``ci`` names the metrics of a horizontal error bar (low, high) drawn around each point.
    """
    title = f"mse vs {x_label}"
    points = _front_points(trials, x_metric)
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


def _row(
    trial: TrialResult,
    columns: list[dict[str, str]],
    baseline: TrialResult | None,
    fronts: dict[str, set[str]],
    page: _Page,
) -> dict[str, Any]:
    """One table row: the trial's axes, status, MLflow run and a cell per metric column."""
    return {
        "id": trial.id,
        "anchor": page.anchors[trial.id],
        "method": trial.method,
        "bits": trial.bits,
        "runtime": trial.runtime,
        "status": trial.status,
        "run_id": trial.mlflow_run_id or "",
        "run_link": run_link(page.tracking, trial.mlflow_run_id),
        "baseline": baseline is not None and trial.id == baseline.id,
        "fronts": [key for key, ids in fronts.items() if trial.id in ids],
        "flags": [asdict(f) for f in trial_flags(trial)],
        "cells": [_cell(trial, c, baseline) for c in columns],
    }


def _flag_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per flag key, the trial ids that carry it (the warning line above a model's table)."""
    found: dict[str, list[str]] = {}
    for row in rows:
        for flag in row["flags"]:
            found.setdefault(flag["key"], []).append(row["id"])
    return [{"key": key, "ids": ids} for key, ids in found.items()]


def _model_view(name: str, trials: list[TrialResult], index: int, page: _Page) -> dict[str, Any]:
    """Summary, charts and table of one model."""
    baseline = find_baseline(trials)
    columns = _columns(trials)
    fronts = {
        key: set(pareto_front(_front_points(trials, metric)))
        for key, metric in (("size", "compression_ratio"), ("speed", "speedup_vs_fp32_b1"))
    }
    legend = sorted({(method_label(t), page.colors[(t.method, t.bits)]) for t in trials})
    rows = [_row(t, columns, baseline, fronts, page) for t in trials]
    return {
        "name": name,
        "section_id": f"model-{index}",
        "baseline": baseline.id if baseline else "",
        "best": {
            "size": best_trial(trials, "compression_ratio"),
            "speed": best_trial(trials, "speedup_vs_fp32_b1"),
            "error": best_trial(
                [t for t in trials if t.method != BASELINE_METHOD], "mse", lowest=True, kind="sci"
            ),
        },
        "pareto": {
            key: [trial_label(t) for t in trials if t.id in ids] for key, ids in fronts.items()
        },
        "charts": [
            _chart(trials, "compression_ratio", "compression ratio", page),
            _chart(
                trials,
                "speedup_vs_fp32_b1",
                "speed-up b1",
                page,
                ci=("speedup_ci_low_b1", "speedup_ci_high_b1"),
            ),
        ],
        "legend": [{"label": label, "color": color} for label, color in legend],
        "markers": [
            {"runtime": r, "marker": mk}
            for r, mk in page.markers.items()
            if any(t.runtime == r for t in trials)
        ],
        "columns": columns,
        "rows": rows,
        "flagged": _flag_summary(rows),
        "latency": [latency_chart(trials, n, page.styling()) for n in sample_batches(trials)],
        "layers": layer_views(trials, page.styling()),
    }


def _text(value: Any) -> str:
    """A header field as text; ``""`` where the record has none (0 stays ``"0"``)."""
    return "" if value is None else str(value)


def _env_value(value: Any) -> str:
    """Strings as they are; numbers, lists, mappings and null as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def build_view(record: RunRecord) -> dict[str, Any]:
    """Everything the template shows, computed: plain dicts, lists, strings and numbers.

    Keys: ``experiment`` (name, source, created), ``counts`` (total, finished, failed),
    ``tracking`` (uri, experiment_id), ``models`` (per model: ``best`` size/speed/error,
    ``pareto`` size/speed labels, ``charts``, ``columns``, ``rows``, ``latency`` charts per
    batch size, ``layers`` of the worst trials), ``failed`` and ``env``.
    """
    models: dict[str, list[TrialResult]] = {}
    for trial in record.trials:
        models.setdefault(trial.model, []).append(trial)
    page = _Page.of(record)
    failed = [t for t in record.trials if not t.ok]
    return {
        "experiment": {
            "name": _text(record.experiment.get("name")) or "unnamed experiment",
            "source": _text(record.experiment.get("source")),
            "created": record.created,
        },
        "counts": {
            "total": len(record.trials),
            "finished": len(record.trials) - len(failed),
            "failed": len(failed),
        },
        "tracking": _tracking_view(record.tracking),
        "models": [
            _model_view(name, trials, i, page) for i, (name, trials) in enumerate(models.items())
        ],
        "failed": [
            {
                "id": t.id,
                "anchor": page.anchors[t.id],
                "label": trial_label(t),
                "model": t.model,
                "phase": t.error.phase if t.error else "",
                "reason": t.error.reason if t.error else "",
            }
            for t in failed
        ],
        "env": [{"key": str(k), "value": _env_value(v)} for k, v in record.env.items()],
        "schema_version": record.schema_version,
    }


@lru_cache(maxsize=1)
def _environment() -> Environment:
    """The Jinja2 environment: templates of this package, autoescape on for everything."""
    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_template(name: str, **context: Any) -> str:
    """Render one of the package's templates (autoescaped) with ``context``."""
    return _environment().get_template(name).render(**context)


def render_html(record: RunRecord) -> str:
    """The report page of ``record`` as one self-contained HTML document."""
    return _environment().get_template("report.html.j2").render(view=build_view(record))


def write_html(record: RunRecord, path: Path) -> Path:
    """Render ``record`` and write it to ``path`` atomically; returns ``path``."""
    path = Path(path)
    write_text_atomic(path, render_html(record))
    return path
