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
