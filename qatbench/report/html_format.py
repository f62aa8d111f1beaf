"""How the report pages write a trial: labels, numbers, the baseline's axes and run links.

The leaf under :mod:`qatbench.report.html`, :mod:`qatbench.report.html_charts` and
:mod:`qatbench.report.pages`: ``FORMATS`` turns a metric into text by its column kind,
:func:`finite_metric` is the value a finished trial reports (else the page shows it as
missing), :func:`method_label` and :func:`trial_label` name a trial, ``BASELINE_METHOD`` and
``BASELINE_RUNTIME`` say which trial is a model's fp32 reference, and :func:`run_link` is the
address of a trial's run in an MLflow server's UI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlparse

from qatbench.results import TrialResult

BASELINE_METHOD, BASELINE_RUNTIME = "fp32", "torch"  # a model's reference trial
# measure.error caps the SQNR of identical outputs at 400 dB so it stays a number: shown "exact"
SQNR_EXACT_DB = 400.0


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
    "acc": lambda v: f"{v:.2f}",  # percent; an eval set of a few hundred samples
    "pct": lambda v: f"{v:.0%}",
    "pct_points": lambda v: f"{v:.2f}",  # already in percent
    "delta": lambda v: f"{v:+.4f}",
    # a task's own metric (embedding cosine, a user's score): five significant digits, so a
    # cosine of 0.99183 is not rounded up to the 0.995 it is compared against
    "task": lambda v: f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.5g}",
}


def finite_metric(trial: TrialResult, name: str) -> float | None:
    """A finite metric of a finished trial, else None (missing, NaN or infinite)."""
    value = trial.metrics.get(name)
    return value if trial.ok and value is not None and math.isfinite(value) else None


def method_label(trial: TrialResult) -> str:
    """``ptq w8a8``; the bit-width is left out where it repeats the method (``fp32``)."""
    return trial.method if trial.bits == trial.method else f"{trial.method} {trial.bits}"


def trial_label(trial: TrialResult) -> str:
    """``ptq w8a8 · onnxruntime``."""
    return f"{method_label(trial)} · {trial.runtime}"


def run_link(tracking: dict[str, Any], run_id: str | None) -> str:
    """MLflow UI address of a run when the tracking URI is an http(s) server, else ``""``."""
    uri, experiment_id = str(tracking.get("uri") or ""), tracking.get("experiment_id")
    if not run_id or experiment_id is None or urlparse(uri).scheme not in ("http", "https"):
        return ""
    return f"{uri.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}"
