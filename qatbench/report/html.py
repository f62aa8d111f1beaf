"""``report.html``: one self-contained page (inline CSS, JS and SVG) rendered from a RunRecord.

Compute and render apart: :func:`build_view` turns the record into plain dicts, lists,
strings and numbers (best methods, Pareto sets, formatted cells, chart geometry); the
Jinja2 template only loops over that view. Autoescaping is on, so every string that comes
from the record (model names, failure reasons, environment values) reaches the page escaped.
Nothing is invented: a metric a trial did not report is shown as missing. The scatter
charts and the styles they share are :mod:`qatbench.report.html_charts`; labels, number
formats and run links are :mod:`qatbench.report.html_format`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from qatbench.report.distributions import latency_chart, layer_views, sample_batches
from qatbench.report.flags import parity_flag, trial_flags
from qatbench.report.html_charts import Page, front_points, pareto_front, scatter_chart
from qatbench.report.html_format import (
    BASELINE_METHOD,
    BASELINE_RUNTIME,
    FORMATS,
    SQNR_EXACT_DB,
    finite_metric,
    method_label,
    run_link,
    trial_label,
)
from qatbench.results import RunRecord, TrialResult, write_text_atomic

TEMPLATES = Path(__file__).parent / "templates"
_BATCH_METRIC = re.compile(r"^(?:latency_p50_ms|throughput_per_s|speedup_vs_fp32)_b(\d+)$")

# Table columns as (metric, header, format kind); "{n}" stands for a batch size. The task
# quality and error columns come first after the trial, so they are in view on any screen.
_QUALITY_COLUMNS = (
    ("accuracy", "accuracy %", "acc"),
    # language models (text data): quality
    ("perplexity", "perplexity", "num"),
    ("perplexity_delta_vs_fp32", "Δ ppl", "delta"),
    ("next_token_accuracy", "next-token acc %", "pct_points"),
    ("mse", "mse", "sci"),
    ("max_abs_error", "max |err|", "sci"),
    ("sqnr_db", "SQNR dB", "db"),
    ("cosine", "cosine", "cos"),
    ("onnx_parity_max_abs", "ONNX parity", "sci"),
    ("int_op_fraction", "int ops", "pct"),
    ("quantized_weight_fraction", "quantized weights", "pct"),
)
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
    # language models: generation at batch 1
    ("prefill_latency_p50_ms", "prefill ms", "num"),
    ("decode_tokens_per_s", "decode tok/s", "num"),
    ("kv_cache_bytes", "KV cache", "bytes"),
    ("onnx_size_bytes", "ONNX size", "bytes"),
)
# Cells whose second line is the change against the fp32 baseline.
_DELTA_NOTES = frozenset({"size_bytes", "accuracy", "next_token_accuracy"})  # ppl: own column
_ARROWS = {1: "\u2191", -1: "\u2193"}  # higher / lower is better
_WAYS = {1: "higher is better", -1: "lower is better"}


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


def best_trial(
    trials: Iterable[TrialResult], metric: str, lowest: bool = False, kind: str = "ratio"
) -> dict[str, Any] | None:
    """The trial with the highest (or lowest) finite ``metric``: label, id and formatted value."""
    scored = [(v, t) for t in trials if (v := finite_metric(t, metric)) is not None]
    if not scored:
        return None
    value, trial = (min if lowest else max)(scored, key=lambda pair: pair[0])
    return {
        "label": trial_label(trial),
        "id": trial.id,
        "metric": metric,
        "text": FORMATS[kind](value),
    }


# The quality card: the first task metric a model's trials report, (metric, title, kind, lowest).
_QUALITY_CARDS = (
    ("accuracy", "best accuracy (quantized)", "pct_points", False),
    ("next_token_accuracy", "best next-token accuracy (quantized)", "pct_points", False),
    ("perplexity", "lowest perplexity (quantized)", "num", True),
)


def best_quality(trials: list[TrialResult], baseline: TrialResult | None) -> dict[str, Any] | None:
    """The quantized trial with the best task metric, with its change against fp32."""
    quantized = [t for t in trials if t.method != BASELINE_METHOD]
    carded = {metric for metric, _, _, _ in _QUALITY_CARDS}
    own = [  # any other task's metrics (embedding cosine, a user's), in declared order
        (m, f"{'best' if way > 0 else 'lowest'} {m.replace('_', ' ')} (quantized)", "task", way < 0)
        for m, way in task_directions_of(quantized).items()
        if m not in carded
    ]
    for metric, title, kind, lowest in (*_QUALITY_CARDS, *own):
        best = best_trial(quantized, metric, lowest=lowest, kind=kind)
        if best is None:
            continue
        if kind == "pct_points":
            best["text"] += "%"
        trial = next(t for t in quantized if t.id == best["id"])
        value, base = (
            finite_metric(trial, metric),
            finite_metric(baseline, metric) if baseline else None,
        )
        best["title"] = title
        if kind == "task":
            note = _task_note(trial, metric, baseline)
            best["delta"] = f"{note} vs fp32" if note else ""
            return best
        best["delta"] = (
            f"Δ {value - base:+.2f} vs fp32 ({FORMATS[kind](base)})"
            if value is not None and base is not None
            else ""
        )
        return best
    return None


def task_directions_of(trials: Iterable[TrialResult]) -> dict[str, int]:
    """Each task metric the trials report with its direction (+1 higher, -1 lower is better),
    in the order the tasks declare them: what a trial records in ``details.metric_directions``
    (the experiment's own task, a user's metric), else the built-in tasks' declarations."""
    from qatbench.data.tasks import task_directions

    built_in = task_directions()
    out: dict[str, int] = {}
    for trial in trials:
        declared = trial.details.get("metric_directions") or {}
        for name, way in declared.items():
            if way in ("higher", "lower") and name in trial.metrics:
                out.setdefault(name, 1 if way == "higher" else -1)
        for name, direction in built_in.items():
            if name in trial.metrics:
                out.setdefault(name, direction)
    return out


def _task_columns(directions: dict[str, int], fixed: set[str]) -> list[tuple[str, str, str]]:
    """A column per task metric that has no fixed column, headed by its name and an arrow."""
    return [
        (name, f"{name.replace('_', ' ')} {_ARROWS[way]}", "task")
        for name, way in directions.items()
        if name not in fixed
    ]


def _columns(trials: list[TrialResult]) -> list[dict[str, Any]]:
    """The metric columns that at least one of ``trials`` reports: the task's metrics first
    (the built-ins' in their fixed place and format, any other task's by its declared names),
    then output error, size, speed per batch size and the rest, in a fixed order."""
    batched = [
        (m.format(n=n), h.format(n=n), k) for n in batch_sizes(trials) for m, h, k in _BATCH_COLUMNS
    ]
    present = {name for t in trials for name in t.metrics}
    directions = task_directions_of(trials)
    fixed = {m for m, _, _ in (*_QUALITY_COLUMNS, *_HEAD_COLUMNS, *_TAIL_COLUMNS)}
    ordered = (
        *_QUALITY_COLUMNS[:4],  # accuracy, perplexity and its delta, next-token accuracy
        *_task_columns(directions, fixed),
        *_QUALITY_COLUMNS[4:],  # output error against fp32, parity, integer share
        *_HEAD_COLUMNS,
        *batched,
        *_TAIL_COLUMNS,
    )
    return [
        {
            "metric": m,
            "header": h,
            "kind": k,
            "task": m in directions,
            "direction": _WAYS.get(directions.get(m, 0), ""),
        }
        for m, h, k in ordered
        if m in present
    ]


def _delta_note(trial: TrialResult, metric: str, baseline: TrialResult | None) -> str:
    """Size and task-quality change against the fp32 baseline, as the cell's second line."""
    value = finite_metric(trial, metric)
    base = finite_metric(baseline, metric) if baseline is not None else None
    if value is None or baseline is None or trial.id == baseline.id:
        return ""
    if metric == "size_bytes":
        return f"{value / base - 1:+.1%} vs fp32" if base else ""
    recorded = finite_metric(trial, f"{metric}_delta_vs_fp32")
    delta = recorded if recorded is not None else (value - base if base is not None else None)
    return "" if delta is None else f"Δ {delta:+.2f}"


def _ci_note(trial: TrialResult, metric: str) -> str:
    """``[low, high]`` of a speed-up's 95% interval when the trial reports both ends."""
    n = metric.rsplit("_b", 1)[1]
    low = finite_metric(trial, f"speedup_ci_low_b{n}")
    high = finite_metric(trial, f"speedup_ci_high_b{n}")
    return f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""


def _task_note(trial: TrialResult, metric: str, baseline: TrialResult | None) -> str:
    """A task metric's change against fp32: the trial's recorded ``_delta_vs_fp32``, else the
    difference to the fp32 baseline's value; none on the baseline itself."""
    if baseline is not None and trial.id == baseline.id:
        return ""
    delta = finite_metric(trial, f"{metric}_delta_vs_fp32")
    if delta is None:
        value = finite_metric(trial, metric)
        base = finite_metric(baseline, metric) if baseline is not None else None
        delta = value - base if value is not None and base is not None else None
    return "" if delta is None else f"\u0394 {delta:+.3g}"


def _cell(
    trial: TrialResult, column: dict[str, Any], baseline: TrialResult | None
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
    elif column["kind"] == "task":
        note = _task_note(trial, metric, baseline)
    else:
        note = "mismatch" if flag else ""
    text = "exact" if metric == "sqnr_db" and raw >= SQNR_EXACT_DB else FORMATS[column["kind"]](raw)
    return {"text": text, "value": repr(raw), "note": note, "flag": flag}


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


def _row(
    trial: TrialResult,
    columns: list[dict[str, Any]],
    baseline: TrialResult | None,
    fronts: dict[str, set[str]],
    page: Page,
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


def _model_view(name: str, trials: list[TrialResult], index: int, page: Page) -> dict[str, Any]:
    """Summary, charts and table of one model."""
    baseline = find_baseline(trials)
    columns = _columns(trials)
    fronts = {
        key: set(pareto_front(front_points(trials, metric)))
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
            "quality": best_quality(trials, baseline),
        },
        "pareto": {
            key: [trial_label(t) for t in trials if t.id in ids] for key, ids in fronts.items()
        },
        "charts": [
            scatter_chart(trials, "compression_ratio", "compression ratio", page),
            scatter_chart(
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
    page = Page.of(record)
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
        "picks": [dict(p) for p in record.picks],  # the top card (report/pick.py)
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
