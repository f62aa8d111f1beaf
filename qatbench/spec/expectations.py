"""Expectations on trial metrics: ``"mse < 0.01"``, ``"compression_ratio >= 3.9"``."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "==": operator.eq,
}
_NEGATION = {"<=": ">", ">=": "<", "<": ">=", ">": "<=", "==": "!="}
_PATTERN = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(<=|>=|==|<|>)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$")


# Metrics that compare the candidate's outputs with fp32's (or the labels): a trial whose
# outputs are degenerate (``output_degenerate`` 1: all zero, NaN/Inf, or fp32 outputs too
# small to compare) fails every expectation on them, whatever their values.
QUALITY_METRICS = frozenset(
    {
        "mse",
        "max_abs_error",
        "sqnr_db",
        "cosine",
        "accuracy",
        "accuracy_delta_vs_fp32",
        "perplexity",
        "perplexity_delta_vs_fp32",
        "next_token_accuracy",
        "worst_layer_sqnr_db",
    }
)


@dataclass(frozen=True)
class Expectation:
    metric: str
    op: str
    value: float

    def check(self, metrics: Mapping[str, float], trial_id: str) -> str | None:
        """None when it holds (or the trial did not report the metric), else one line."""
        if self.metric not in metrics:
            return None
        actual = metrics[self.metric]
        if self.metric in QUALITY_METRICS and metrics.get("output_degenerate") == 1.0:
            return f"{self} cannot hold: the outputs are degenerate ({trial_id})"
        if _OPS[self.op](actual, self.value):
            return None
        return f"{self.metric} {actual:.4g} {_NEGATION[self.op]} {self.value:g} ({trial_id})"

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


def parse_expectation(text: str) -> Expectation:
    """Parse ``metric op number``; raises ValueError saying what is allowed."""
    match = _PATTERN.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(
            f"expectation {text!r} is not 'metric OP number' with OP one of {', '.join(_OPS)}"
        )
    try:
        value = float(match[3])
    except ValueError:
        raise ValueError(f"expectation {text!r}: {match[3]!r} is not a number") from None
    return Expectation(match[1], match[2], value)
