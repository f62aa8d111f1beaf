"""Which way is better for each metric: defined once, read by compare, history and the pick.

:func:`better_direction` is +1 where a higher value is better (speed-up, accuracy, cosine),
-1 where lower is (latency, error, size, perplexity), 0 where the name does not say. A
``*_delta_vs_fp32`` or ``*_fp32`` metric has the direction of the metric it derives from
(the patterns match on the prefix). A task's own metrics take the direction the task
declares (:attr:`qatbench.data.tasks.Task.directions`), passed in as ``declared``.

:data:`QUALITY_METRICS` are the metrics a quality budget may bound (``budget:`` in an
experiment, ``qatbench pick --budget``): the output error against fp32 and every task
metric with its ``_delta_vs_fp32``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_HIGHER_BETTER = re.compile(
    r"^(?:throughput_|speedup_|accuracy|sqnr|cosine|compression_ratio|int_op_fraction|"
    r"worst_layer_sqnr|onnx_export_ok|onnx_parity_ok|next_token_accuracy|"
    r"(?:fp32_|recompute_)?(?:prefill|decode)_tokens_per_s|(?:prefill|decode)_speedup|"
    r"greedy_prefix_match)"
)
_LOWER_BETTER = re.compile(
    r"^(?:latency_|fp32_latency_|mse|max_abs_error|size_bytes|weight_bytes|peak_rss|model_rss|"
    r"perplexity|bits_per_token|onnx_parity_max_abs|onnx_size|prefill_latency|"
    r"(?:recompute_)?decode_latency|"
    r"kv_cache_bytes|weights_plus_kv_cache_bytes)"
)
# the spread of latency (coefficient of variation) is not a quality to maximise or minimise
_SPREAD = re.compile(r"^latency_cv_b\d+$")
_DERIVED = re.compile(r"^(?P<base>.+?)(?:_delta_vs_fp32|_fp32)$")

# Output error of the candidate against the fp32 model on the evaluation data.
OUTPUT_ERROR_METRICS = ("mse", "max_abs_error", "sqnr_db", "cosine", "worst_layer_sqnr_db")


def better_direction(metric: str, declared: Mapping[str, int] | None = None) -> int:
    """+1 higher is better, -1 lower is better, 0 unknown (see the module docstring)."""
    if declared:
        derived = _DERIVED.match(metric)
        for name in (metric, derived["base"] if derived else None):
            if name is not None and name in declared:
                return declared[name]
    if _LOWER_BETTER.match(metric) and not _SPREAD.match(metric):
        return -1
    return 1 if _HIGHER_BETTER.match(metric) else 0


def quality_metrics(task_directions: Mapping[str, int]) -> dict[str, int]:
    """Every metric a budget may bound with its direction: output error, each task metric,
    its fp32 delta."""
    out = {m: better_direction(m) for m in OUTPUT_ERROR_METRICS}
    for name, direction in task_directions.items():
        out[name] = direction
        out[f"{name}_delta_vs_fp32"] = direction
    return out
