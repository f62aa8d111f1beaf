"""Expectations on trial metrics (qatbench.spec.expectations) and how a run checks them."""

from __future__ import annotations

import math

import pytest

from qatbench.results import RunRecord, TrialFailure, TrialResult
from qatbench.spec.expectations import Expectation, parse_expectation
from qatbench.spec.schema import validate_experiment
from qatbench.sweep.outcome import check_expectations


@pytest.mark.parametrize(
    ("text", "metric", "op", "value"),
    [
        ("mse < 0.01", "mse", "<", 0.01),
        ("compression_ratio >= 3.9", "compression_ratio", ">=", 3.9),
        ("accuracy_delta_vs_fp32 > -5", "accuracy_delta_vs_fp32", ">", -5.0),
        ("latency_p50_ms_b1 <= 1e-3", "latency_p50_ms_b1", "<=", 0.001),
        ("sqnr_db>=+20", "sqnr_db", ">=", 20.0),
        ("  int_op_fraction == 1  ", "int_op_fraction", "==", 1.0),
        ("cosine > .99", "cosine", ">", 0.99),
        ("size_bytes < 2.5E6", "size_bytes", "<", 2.5e6),
    ],
)
def test_parse(text: str, metric: str, op: str, value: float) -> None:
    assert parse_expectation(text) == Expectation(metric, op, value)


@pytest.mark.parametrize(
    "text",
    [
        "accuracy is high",
        "mse <",
        "< 0.1",
        "mse => 0.1",
        "mse != 0.1",
        "mse = 0.1",
        "mse << 0.1",
        "mse < lots",
        "mse < inf",
        "mse < 0.1 and cosine > 0.9",
        "1mse < 0.1",
        "ms e < 0.1",
        "",
    ],
)
def test_parse_rejects_what_is_not_metric_op_number(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_expectation(text)
    message = str(info.value)
    assert repr(text) in message
    assert "'metric OP number'" in message
    assert "<=, >=, <, >, ==" in message


@pytest.mark.parametrize("text", ["mse < 1.2.3", "mse < .", "mse < 1e"])
def test_parse_rejects_a_malformed_number(text: str) -> None:
    with pytest.raises(ValueError, match="not"):
        parse_expectation(text)


@pytest.mark.parametrize("value", [None, 5, ["mse < 1"]])
def test_parse_rejects_non_strings_with_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="metric OP number"):
        parse_expectation(value)  # type: ignore[arg-type]  # the YAML may hold anything


def test_breach_line_names_metric_actual_negated_op_limit_and_trial() -> None:
    expectation = parse_expectation("mse <= 0.05")
    assert expectation.check({"mse": 0.083}, "mlp-ptq-w4a8-torch") == (
        "mse 0.083 > 0.05 (mlp-ptq-w4a8-torch)"
    )


@pytest.mark.parametrize(
    ("text", "actual", "line"),
    [
        ("mse < 0.05", 0.05, "mse 0.05 >= 0.05 (t)"),
        ("mse < 0.05", 0.0834567, "mse 0.08346 >= 0.05 (t)"),
        ("compression_ratio >= 3.9", 3.68, "compression_ratio 3.68 < 3.9 (t)"),
        ("accuracy_delta_vs_fp32 > -5", -7.25, "accuracy_delta_vs_fp32 -7.25 <= -5 (t)"),
        ("int_op_fraction == 1", 0.5, "int_op_fraction 0.5 != 1 (t)"),
        ("size_bytes < 1e6", 2_500_000.0, "size_bytes 2.5e+06 >= 1e+06 (t)"),
    ],
)
def test_breach_lines(text: str, actual: float, line: str) -> None:
    metric = text.split()[0]
    assert parse_expectation(text).check({metric: actual}, "t") == line


@pytest.mark.parametrize(
    ("text", "actual"),
    [
        ("mse < 0.05", 0.049),
        ("mse <= 0.05", 0.05),
        ("cosine >= 0.99", 0.99),
        ("accuracy_delta_vs_fp32 > -5", -4.99),
        ("int_op_fraction == 1", 1.0),
    ],
)
def test_holding_expectations_give_none(text: str, actual: float) -> None:
    metric = text.split()[0]
    assert parse_expectation(text).check({metric: actual}, "t") is None


def test_a_metric_the_trial_did_not_report_is_not_a_breach() -> None:
    assert parse_expectation("perplexity < 10").check({"accuracy": 97.0}, "t") is None


@pytest.mark.parametrize("op", ["<", "<=", ">", ">=", "=="])
def test_nan_never_satisfies_an_expectation(op: str) -> None:
    line = parse_expectation(f"mse {op} 0.01").check({"mse": math.nan}, "t")
    assert line is not None
    assert line.startswith("mse nan ")
    assert line.endswith(" 0.01 (t)")


def test_str_round_trips_through_parse() -> None:
    for text in ("mse < 0.01", "compression_ratio >= 3.9", "accuracy_delta_vs_fp32 > -5"):
        expectation = parse_expectation(text)
        assert str(expectation) == text
        assert parse_expectation(str(expectation)) == expectation


# --- a run's expectations ------------------------------------------------------------------


def _result(trial_id: str, status: str = "finished", **metrics: float) -> TrialResult:
    model, method, bits, runtime = trial_id.split("-")
    return TrialResult(
        id=trial_id,
        model=model,
        method=method,
        bits=bits,
        runtime=runtime,
        status=status,
        metrics=metrics,  # type: ignore[arg-type]  # one of two literals
        error=TrialFailure("convert", "boom") if status == "failed" else None,
    )


def test_check_expectations_applies_each_level_to_its_trials_and_skips_failures() -> None:
    spec = validate_experiment(
        {
            "name": "exp",
            "models": [{"name": "mlp", "expect": ["accuracy > 90"]}],
            "methods": ["fp32", {"name": "ptq", "expect": ["mse <= 0.05"]}],
            "bits": ["w8a8", "w4a8"],
            "runtimes": ["torch"],
            "expect": ["compression_ratio >= 1"],
        }
    )
    record = RunRecord(
        experiment={"name": "exp"},
        created="2025-01-01T00:00:00+00:00",
        env={},
        trials=(
            # fp32: mse is not its expectation, so a large mse is fine; accuracy is breached
            _result("mlp-fp32-fp32-torch", compression_ratio=1.0, accuracy=80.0, mse=1.0),
            _result("mlp-ptq-w8a8-torch", compression_ratio=3.7, accuracy=97.0, mse=0.083),
            # a failed trial reports its own failure, not breaches of partial metrics
            _result("mlp-ptq-w4a8-torch", status="failed", compression_ratio=0.5, mse=9.0),
        ),
    )
    assert check_expectations(spec, record) == [
        "accuracy 80 <= 90 (mlp-fp32-fp32-torch)",
        "mse 0.083 > 0.05 (mlp-ptq-w8a8-torch)",
    ]


def test_check_expectations_ignores_trials_missing_from_the_record() -> None:
    spec = validate_experiment(
        {"name": "exp", "models": ["mlp"], "methods": ["fp32"], "expect": ["mse < 0"]}
    )
    record = RunRecord(experiment={"name": "exp"}, created="2025-01-01T00:00:00+00:00", env={})
    assert check_expectations(spec, record) == []
