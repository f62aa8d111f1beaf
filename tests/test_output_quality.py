"""Quality figures that cannot mislead: degenerate outputs are detected, flagged, and fail
every quality expectation whatever the metric's value."""

from __future__ import annotations

import math

import pytest
import torch

from qatbench.measure.error import degenerate_outputs, output_error
from qatbench.report.flags import degenerate_flag
from qatbench.results import TrialResult
from qatbench.spec.expectations import parse_expectation

REF = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("reference", "actual", "why"),
    [
        (REF, torch.zeros_like(REF), "all zero"),
        (REF, torch.full_like(REF, math.nan), "NaN or Inf"),
        (REF, REF.clone().index_fill_(0, torch.tensor([3]), math.inf), "NaN or Inf"),
        (REF * 1e-9, REF * 1e-9, "too small to compare"),
    ],
)
def test_degenerate_outputs_are_named(reference, actual, why) -> None:
    reason = degenerate_outputs(reference, actual)
    assert reason is not None and why in reason


def test_healthy_outputs_are_not_degenerate() -> None:
    assert degenerate_outputs(REF, REF + 0.01 * torch.randn_like(REF)) is None


def test_tiny_fp32_outputs_would_otherwise_look_perfect() -> None:
    # the trap: identical, vanishing outputs give cosine 1 and a fine SQNR
    tiny = REF * 1e-9
    assert output_error(tiny, tiny)["cosine"] > 0.999
    assert degenerate_outputs(tiny, tiny) is not None


def test_quality_expectations_fail_on_degenerate_outputs_and_others_still_hold() -> None:
    metrics = {"cosine": 1.0, "compression_ratio": 4.0, "output_degenerate": 1.0}
    breach = parse_expectation("cosine > 0.99").check(metrics, "t")
    assert breach is not None and "degenerate" in breach
    assert parse_expectation("compression_ratio > 3").check(metrics, "t") is None
    metrics["output_degenerate"] = 0.0
    assert parse_expectation("cosine > 0.99").check(metrics, "t") is None


def test_degenerate_trials_carry_a_flag() -> None:
    trial = TrialResult(
        id="t",
        model="m",
        method="ptq",
        bits="w8a8",
        runtime="torch",
        status="finished",
        metrics={"output_degenerate": 1.0},
        details={"output_degenerate": "the outputs are all zero"},
    )
    flag = degenerate_flag(trial)
    assert flag is not None and "all zero" in flag.title
    trial.metrics["output_degenerate"] = 0.0
    assert degenerate_flag(trial) is None
