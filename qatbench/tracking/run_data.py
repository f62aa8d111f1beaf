"""A trial result as the data of its MLflow run: metrics, flattened params and tags."""

from __future__ import annotations

import importlib.metadata
import math
import time
from collections.abc import Mapping
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from qatbench.results import TrialResult


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys; lists and tuples kept as their str()."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = str(value) if isinstance(value, list | tuple) else value
    return flat


def trial_tags(result: TrialResult, extra: Mapping[str, str] | None) -> dict[str, str]:
    """qatbench's own tags of a trial's run over ``extra``; non-finite metrics named."""
    own = {
        "qatbench.version": qatbench_version(),
        "qatbench.status": result.status,
        "qatbench.trial_id": result.id,
        "model": result.model,
        "method": result.method,
        "bits": result.bits,
        "runtime": result.runtime,
    }
    if result.error is not None:
        own["qatbench.error"] = f"{result.error.phase}: {result.error.reason}"
    nonfinite = sorted(k for k, v in result.metrics.items() if not math.isfinite(v))
    if nonfinite:
        own["qatbench.nonfinite_metrics"] = ",".join(nonfinite)
    merged = {**(extra or {}), **own}
    return {k: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in merged.items()}


def trial_metrics(result: TrialResult) -> list[Metric]:
    now_ms = int(time.time() * 1000)
    return [
        Metric(key, float(value), now_ms, 0)
        for key, value in result.metrics.items()
        if math.isfinite(value)
    ]


def trial_params(result: TrialResult, params: Mapping[str, Any]) -> list[Param]:
    flat = {**flatten(result.params), **flatten(params)}
    return [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flat.items()]


def qatbench_version() -> str:
    import qatbench

    version = getattr(qatbench, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("qatbench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
