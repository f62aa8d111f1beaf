"""Bit-width labels of the grid: ``w8a8``, ``w4a8``, ``w4`` (weight-only), ``fp32``."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = re.compile(r"^w(?P<w>\d+)(?:a(?P<a>\d+))?$")


@dataclass(frozen=True, order=True)
class BitWidth:
    """Weight bits and activation bits (``None``: activations stay floating point).

    ``weight=32`` with no activation bits is the unquantized label ``fp32``.
    """

    weight: int
    activation: int | None = None

    @classmethod
    def parse(cls, label: str) -> BitWidth:
        """Parse a label; raises ``ValueError`` with what is allowed."""
        if label == "fp32":
            return FP32
        match = _LABEL.match(label.strip())
        if not match:
            raise ValueError(
                f"bit-width {label!r} is not of the form wN (weight-only), wNaM or fp32"
            )
        weight = int(match["w"])
        activation = int(match["a"]) if match["a"] else None
        for bits in (weight, activation):
            if bits is not None and not 2 <= bits <= 16:
                raise ValueError(f"bit-width {label!r}: bits must be between 2 and 16")
        return cls(weight, activation)

    @property
    def label(self) -> str:
        if self == FP32:
            return "fp32"
        return f"w{self.weight}" + (f"a{self.activation}" if self.activation else "")

    @property
    def weight_only(self) -> bool:
        return self.activation is None

    def __str__(self) -> str:
        return self.label


FP32 = BitWidth(32, None)
