"""Warnings a report row carries, computed from one trial: plain data for the templates.

- ``simulated``: the method quantizes in simulation only, so nobody mistakes its numbers for
  integer inference. Either the trial says so (``details["simulated"]`` true: fake-quant,
  or ``naive_int8`` dequantizing on every call), or its bits are integer (8 or fewer weight bits)
  while its exported graph runs no integer kernel (``int_op_fraction`` 0).
- ``partial``: the trial's bits are integer but under half of the model's weight bytes
  sit in layers it quantized (``quantized_weight_fraction`` < 0.5), whatever the method
  claims: e.g. a Linear-only method on a CNN.
- ``degenerate``: the candidate's outputs are all zero, NaN or Inf, or the fp32 outputs
  are too small to compare (``output_degenerate`` 1): no quality figure means anything.
- ``parity``: onnxruntime disagrees with the torch model beyond the export check's
  tolerance (``onnx_parity_ok`` 0); the ONNX parity cell is marked too.
- ``budget``: ``keep_fp32: auto`` found no configuration within the experiment's budget
  (``budget_met`` 0); the trial is the closest one it found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qatbench.quant.bitwidth import BitWidth
from qatbench.results import TrialResult

INTEGER_MAX_BITS = 8  # wider "bits" (w16a16 casts, fp32) are floating point by design
PARTIAL_BELOW = 0.5  # quantized_weight_fraction under which a trial is flagged partial


@dataclass(frozen=True)
class Flag:
    """One badge: a stable ``key`` (CSS class, tests), its short ``text`` and a ``title``."""

    key: str
    text: str
    title: str


def integer_bits(bits: str) -> bool:
    """Whether a bit-width label names integer weights (``w8a8``, ``w4``; not ``fp32``)."""
    try:
        return BitWidth.parse(bits).weight <= INTEGER_MAX_BITS
    except ValueError:
        return False


def _finite(trial: TrialResult, name: str) -> float | None:
    value = trial.metrics.get(name)
    return value if value is not None and math.isfinite(value) else None


def simulated_flag(trial: TrialResult) -> Flag | None:
    """The ``simulated`` badge of a finished trial, with why, or None."""
    if not trial.ok:
        return None
    if trial.details.get("simulated") is True:
        return Flag(
            "simulated",
            "simulated",
            f"{trial.method} computes in floating point (fake-quant, or integers dequantized "
            "on every call): its speed is not that of integer inference",
        )
    fraction = _finite(trial, "int_op_fraction")
    if fraction == 0.0 and integer_bits(trial.bits):
        return Flag(
            "simulated",
            "simulated",
            f"{trial.bits} claims integer weights, but int_op_fraction is 0: no node of the "
            "exported graph runs an integer kernel",
        )
    return None


def parity_flag(trial: TrialResult) -> Flag | None:
    """The ONNX parity mismatch badge (``onnx_parity_ok`` 0), naming the difference."""
    if not trial.ok or _finite(trial, "onnx_parity_ok") != 0.0:
        return None
    worst = _finite(trial, "onnx_parity_max_abs")
    shown = f"max |torch - onnxruntime| = {worst:.3g}" if worst is not None else "see the trial"
    return Flag(
        "parity",
        "ONNX parity \u2717",  # ballot x
        f"onnxruntime's outputs disagree with the torch model ({shown}): the ONNX graph does "
        "not compute what the torch numbers describe",
    )


def partial_flag(trial: TrialResult) -> Flag | None:
    """The ``partial`` badge: integer bits on under half of the model's weight bytes."""
    fraction = _finite(trial, "quantized_weight_fraction")
    if not trial.ok or fraction is None or fraction >= PARTIAL_BELOW:
        return None
    if not integer_bits(trial.bits):
        return None
    return Flag(
        "partial",
        f"quantized {fraction:.0%}",
        f"{trial.method} quantized layers holding only {fraction:.0%} of the model's weight "
        "bytes (the rest stayed floating point, e.g. convolutions under a Linear-only "
        "method): this is not a quantized model",
    )


def degenerate_flag(trial: TrialResult) -> Flag | None:
    """The ``degenerate`` badge: outputs that no quality metric can judge."""
    if not trial.ok or _finite(trial, "output_degenerate") != 1.0:
        return None
    why = trial.details.get("output_degenerate", "degenerate outputs")
    return Flag(
        "degenerate",
        "outputs degenerate",
        f"{why}: cosine, SQNR and accuracy of this trial compare nothing, whatever they show",
    )


def budget_flag(trial: TrialResult) -> Flag | None:
    """The ``budget`` badge: ``keep_fp32: auto`` found no configuration within budget."""
    if not trial.ok or _finite(trial, "budget_met") != 0.0:
        return None
    search = trial.details.get("keep_fp32_search", {})
    misses = "; ".join(search.get("misses", [])) or "see the trial"
    return Flag(
        "budget",
        "budget not met",
        f"keep_fp32: auto tried {search.get('candidates', '?')} configurations and none met "
        f"the budget on the validation data ({misses}): this is the closest",
    )


def trial_flags(trial: TrialResult) -> list[Flag]:
    """Every flag of ``trial``, in a fixed order."""
    found = (
        degenerate_flag(trial),
        parity_flag(trial),
        budget_flag(trial),
        simulated_flag(trial),
        partial_flag(trial),
    )
    return [f for f in found if f is not None]
