"""A sweep's results for the terminal and for logs: a rich table and one line per trial.

:func:`results_table` is what ``qatbench run`` and ``pytest --qatbench`` print at the end:
per trial its status, size and compression, speed-up at the smallest batch size with its
95% interval, the task metric (accuracy, else next-token accuracy, else perplexity) and
its change against the model's fp32 baseline, and its flags. It fits 100 columns; ``wide``
adds every batch size, latency, error and ONNX columns. :func:`trial_line` is the one
line a log gets when a trial finishes. Both only format what the record holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich import box
from rich.table import Table
from rich.text import Text

from qatbench.report.flags import trial_flags
from qatbench.report.html_format import (
    BASELINE_METHOD,
    BASELINE_RUNTIME,
    FORMATS,
    SQNR_EXACT_DB,
    finite_metric,
    method_label,
)
from qatbench.results import RunRecord, TrialResult

TIMES = "\u00d7"  # multiplication sign
NARROW_WIDTH = 100  # the results table fits this many columns unless --wide

# Task metrics, best first: (metric, short name, format kind ("": 2 decimals), higher is better).
_TASK_METRICS = (
    ("accuracy", "acc %", "", True),
    ("next_token_accuracy", "next-token acc %", "", True),
    ("perplexity", "ppl", "num", False),
)


@dataclass(frozen=True)
class TaskMetric:
    """A trial's task metric and its change against fp32, formatted."""

    name: str
    value: str
    delta: str
    worse: bool  # the change is a loss (for colour)


def _baselines(trials: tuple[TrialResult, ...] | list[TrialResult]) -> dict[str, TrialResult]:
    """Per model, its fp32 torch trial if it finished."""
    return {
        t.model: t
        for t in trials
        if t.ok and t.method == BASELINE_METHOD and t.runtime == BASELINE_RUNTIME
    }


def _batch(trial: TrialResult) -> int | None:
    """The smallest batch size the trial reports a speed-up at."""
    sizes = [
        int(name.rsplit("_b", 1)[1])
        for name in trial.metrics
        if name.startswith("speedup_vs_fp32_b") and name.rsplit("_b", 1)[1].isdigit()
    ]
    return min(sizes) if sizes else None


def speedup_text(trial: TrialResult, batch: int | None = None, interval: bool = True) -> str:
    """``3.49x [3.39, 3.60]`` at ``batch`` (default: the smallest), or ``""``."""
    batch = _batch(trial) if batch is None else batch
    value = finite_metric(trial, f"speedup_vs_fp32_b{batch}") if batch is not None else None
    if value is None:
        return ""
    low = finite_metric(trial, f"speedup_ci_low_b{batch}")
    high = finite_metric(trial, f"speedup_ci_high_b{batch}")
    ci = f" [{low:.2f}, {high:.2f}]" if interval and low is not None and high is not None else ""
    return f"{value:.2f}{TIMES}{ci}"


def _format_task(value: float, kind: str) -> str:
    return FORMATS[kind](value) if kind else f"{value:.2f}"


def task_metric(trial: TrialResult, baseline: TrialResult | None) -> TaskMetric | None:
    """The trial's task metric with its change against ``baseline`` (its own model's fp32):
    a built-in's, else the first metric the trial's task declares (embedding cosine, a
    user's), to five significant digits."""
    declared = [
        (metric, metric, "task", way == "higher")
        for metric, way in (trial.details.get("metric_directions") or {}).items()
        if way in ("higher", "lower")
    ]
    for metric, name, kind, higher in (*_TASK_METRICS, *declared):
        value = finite_metric(trial, metric)
        if value is None:
            continue
        recorded = finite_metric(trial, f"{metric}_delta_vs_fp32")
        base = finite_metric(baseline, metric) if baseline is not None else None
        delta = recorded if recorded is not None else None if base is None else value - base
        if delta is None or (baseline is not None and trial.id == baseline.id):
            return TaskMetric(name, _format_task(value, kind), "", False)
        if kind == "task":  # a cosine's change is in the third decimal
            worse = delta < 0 if higher else delta > 0
            return TaskMetric(name, _format_task(value, kind), f"{delta:+.3g}", worse)
        shown = round(delta, 2) or 0.0  # no "-0.00"
        worse = shown < 0 if higher else shown > 0
        return TaskMetric(name, _format_task(value, kind), f"{shown:+.2f}", worse)
    return None


def _size_text(trial: TrialResult) -> str:
    size = finite_metric(trial, "size_bytes")
    return "" if size is None else FORMATS["bytes"](size)


def _compression_text(trial: TrialResult) -> str:
    ratio = finite_metric(trial, "compression_ratio")
    return "" if ratio is None else f"{ratio:.2f}{TIMES}"


def elapsed_s(trial: TrialResult) -> float:
    """Seconds the trial's lifecycle phases took (its own clock, not the queue's)."""
    return sum(v for v in trial.phases.values() if math.isfinite(v))


def _elapsed_text(seconds: float) -> str:
    if seconds <= 0:
        return ""
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:02.0f}s"


def _status(trial: TrialResult) -> Text:
    if trial.ok:
        return Text("ok", style="green")
    return Text("FAILED", style="bold red")


def _flags(trial: TrialResult) -> str:
    return ", ".join(f.key for f in trial_flags(trial))


def _wide_columns(trials: tuple[TrialResult, ...]) -> list[tuple[str, str, str]]:
    """(metric, header, format kind) of the extra columns of ``--wide`` that some trial has."""
    present = {name for t in trials for name in t.metrics}
    batches = sorted(
        {int(n.rsplit("_b", 1)[1]) for n in present if n.startswith("latency_p50_ms_b")}
    )
    columns = [(f"latency_p50_ms_b{n}", f"p50 ms b{n}", "num") for n in batches]
    columns += [
        ("perplexity", "ppl", "num"),
        ("mse", "mse", "sci"),
        ("sqnr_db", "SQNR dB", "db"),
        ("onnx_parity_max_abs", "ONNX parity", "sci"),
        ("int_op_fraction", "int ops", "pct"),
    ]
    return [c for c in columns if c[0] in present]


def _metric_text(trial: TrialResult, metric: str, kind: str) -> str:
    value = finite_metric(trial, metric)
    if value is None:
        return ""
    return "exact" if metric == "sqnr_db" and value >= SQNR_EXACT_DB else FORMATS[kind](value)


def _task_cells(task: TaskMetric | None, shared: bool) -> list[str | Text]:
    """The task and Δ fp32 cells (the metric's name only where the column does not say it)."""
    if task is None:
        return ["", ""]
    value = task.value if shared else f"{task.name} {task.value}"
    return [value, Text(task.delta, style="red" if task.worse else "")]


def results_table(record: RunRecord, wide: bool = False) -> Table:
    """Every trial of ``record``, grouped by model (see the module doc)."""
    trials = record.trials
    baselines = _baselines(trials)
    batches = sorted(
        {
            int(n.rsplit("_b", 1)[1])
            for t in trials
            for n in t.metrics
            if n.startswith("speedup_vs_fp32_b") and n.rsplit("_b", 1)[1].isdigit()
        }
    )
    speed_batches = batches if wide else batches[:1]
    extra = _wide_columns(trials) if wide else []
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    table.add_column("trial", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("compr.", justify="right", no_wrap=True)
    for n in speed_batches:
        table.add_column(f"speed-up b{n} [95% CI]", justify="right", no_wrap=True)
    names = {task.name for t in trials if (task := task_metric(t, None)) is not None}
    shared = next(iter(names)) if len(names) == 1 else None
    if names:  # no task metric (synthetic data): no empty columns taking the trial's room
        table.add_column(shared or "task", justify="right", no_wrap=True)
        table.add_column("Δ fp32", justify="right", no_wrap=True)
    for _, header, _kind in extra:
        table.add_column(header, justify="right", no_wrap=True)
    flagged = any(_flags(t) for t in trials)
    if flagged:
        table.add_column("flags", min_width=9)
    if wide:  # the log line of each trial has its time
        table.add_column("time", justify="right", no_wrap=True)
    models: dict[str, list[TrialResult]] = {}
    for trial in trials:
        models.setdefault(trial.model, []).append(trial)
    for model, group in models.items():
        table.add_row(Text(model, style="bold"), end_section=False)
        for trial in group:
            task = task_metric(trial, baselines.get(model))
            label = trial.id if wide else f"  {method_label(trial)} · {trial.runtime}"
            cells: list[str | Text] = [
                label,
                _status(trial),
                _size_text(trial),
                _compression_text(trial),
                *(speedup_text(trial, n) for n in speed_batches),
                *(_task_cells(task, shared is not None) if names else []),
                *(_metric_text(trial, metric, kind) for metric, _h, kind in extra),
                *([Text(_flags(trial), style="yellow")] if flagged else []),
                *([_elapsed_text(elapsed_s(trial))] if wide else []),
            ]
            table.add_row(*cells)
    return table


def trial_line(
    trial: TrialResult, baseline: TrialResult | None, elapsed: float | None = None
) -> str:
    """One log line of a finished trial: its id, status, key figures and elapsed time."""
    seconds = elapsed if elapsed is not None else elapsed_s(trial)
    took = f" in {_elapsed_text(seconds)}" if seconds > 0 else ""
    if not trial.ok:
        phase = trial.error.phase if trial.error else "?"
        reason = trial.error.reason if trial.error else ""
        after = f" (after {_elapsed_text(seconds)})" if seconds > 0 else ""
        return f"failed {trial.id}: {phase}: {reason}{after}"
    figures = []
    if size := _size_text(trial):
        compression = _compression_text(trial)
        figures.append(f"size {size}" + (f" ({compression})" if compression else ""))
    if speed := speedup_text(trial):
        figures.append(f"speed-up b{_batch(trial)} {speed}")
    task = task_metric(trial, baseline)
    if task is not None:
        name, unit = task.name.removesuffix(" %"), "%" if task.name.endswith("%") else ""
        delta = f" (Δ {task.delta}{unit and ' pts'})" if task.delta else ""
        figures.append(f"{name.replace('acc', 'accuracy')} {task.value}{unit}{delta}")
    if flags := _flags(trial):
        figures.append(f"flags: {flags}")
    return f"{trial.id} ok{took}" + (f": {', '.join(figures)}" if figures else "")


def baseline_for(record: RunRecord, trial: TrialResult) -> TrialResult | None:
    """The fp32 torch trial of ``trial``'s model in ``record``, if it finished."""
    return _baselines(record.trials).get(trial.model)
