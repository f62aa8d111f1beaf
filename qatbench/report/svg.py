"""Chart geometry shared by every page: scales, domains and tick marks (pure, no markup).

A chart builder maps data onto pixels with a :class:`Scale` and hands the template plain
numbers; the templates only draw them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_DECADES = 6  # the mse axis spans at most this many decades; smaller values sit on it
_LOG_STEPS = (1.0, 2.0, 5.0)


@dataclass(frozen=True)
class Scale:
    """Maps a data interval (in log10 when ``log``) linearly onto a pixel interval."""

    lo: float
    hi: float
    start: float
    end: float
    log: bool = False

    def below(self, value: float) -> bool:
        """Whether a log scale cannot show ``value`` (zero or under its lowest decade)."""
        return self.log and (value <= 0 or math.log10(value) < self.lo)

    def __call__(self, value: float) -> float:
        """Pixel position of ``value``; what a log scale cannot show sits at ``start``."""
        if self.below(value):
            return self.start
        v = math.log10(value) if self.log else value
        return round(self.start + (v - self.lo) / (self.hi - self.lo) * (self.end - self.start), 1)

    def clamped(self, value: float) -> float:
        """Pixel position of ``value`` held inside the pixel interval."""
        low, high = sorted((self.start, self.end))
        return min(max(self(value), low), high)

    def ticks(self) -> list[dict[str, Any]]:
        """About five tick marks: whole decades on a log scale, 1/2/5 steps on a linear one."""
        if self.log:
            step = max(1, math.ceil((self.hi - self.lo) / 6))
            exponents = range(math.ceil(self.lo), math.floor(self.hi) + 1, step)
            return [{"pos": self(10.0**e), "label": f"1e{e}"} for e in exponents]
        raw = (self.hi - self.lo) / 5
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 5, 10) if raw <= m * mag)
        first = math.ceil(self.lo / step)
        count = math.floor(self.hi / step) - first + 1
        return [
            {"pos": self(v), "label": f"{v:g}"}
            for v in (round((first + i) * step, 10) for i in range(count))
        ]

    def log_ticks(self) -> list[dict[str, Any]]:
        """Ticks at 1, 2 and 5 times each decade inside a log scale, labelled plainly."""
        if not self.log:
            return self.ticks()
        ticks = []
        for exponent in range(math.floor(self.lo), math.ceil(self.hi) + 1):
            for step in _LOG_STEPS:
                value = step * 10.0**exponent
                if self.lo <= math.log10(value) <= self.hi:
                    ticks.append({"pos": self(value), "label": f"{value:g}"})
        return ticks if len(ticks) >= 2 else self.ticks()


MIN_RELATIVE_SPAN = 0.02  # a linear axis spans at least 2% of its largest magnitude


def linear_domain(
    values: Sequence[float], min_relative_span: float = MIN_RELATIVE_SPAN
) -> tuple[float, float]:
    """Padded ``(lo, hi)`` around ``values``; a single value gets a window around it.

    The axis spans at least ``min_relative_span`` of the largest magnitude, centred on the
    values, so that 0.99999 against 1.0 does not fill the chart like a real difference."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or max(abs(lo) * 0.1, 0.5)
    lo, hi = lo - pad, hi + pad
    least = min_relative_span * max(abs(lo), abs(hi))
    if hi - lo < least:
        middle = (lo + hi) / 2
        lo, hi = middle - least / 2, middle + least / 2
    return lo, hi


def log_domain(values: Sequence[float]) -> tuple[float, float]:
    """Whole decades ``(lo, hi)`` in log10 around the positive ``values`` (a default if none),
    at most :data:`MAX_DECADES` wide so that round-off-sized errors do not flatten the rest."""
    positive = [v for v in values if v > 0]
    if not positive:
        return -1.0, 0.0
    hi = math.ceil(math.log10(max(positive)) + 0.1)
    return max(math.floor(math.log10(min(positive)) - 0.1), hi - MAX_DECADES), hi


def padded_log_domain(values: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` in log10 tightly around the positive ``values``, padded by 4% each side."""
    logs = [math.log10(v) for v in values if v > 0] or [0.0]
    lo, hi = min(logs), max(logs)
    pad = (hi - lo) * 0.04 or 0.1
    return lo - pad, hi + pad


def auto_scale(values: Sequence[float], start: float, end: float) -> Scale:
    """A log scale when the positive ``values`` span more than a factor of 8, else linear."""
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 8:
        return Scale(*padded_log_domain(positive), start, end, log=True)
    return Scale(*linear_domain(values), start, end)
