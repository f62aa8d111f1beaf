"""``qatbench run --baseline``: the nightly recipe's gate against the previous sweep.

Three sweeps of one small experiment go into one SQLite store, as three nightlies would:
the first has nothing to compare with, the second (unchanged) passes its comparison with the
first, the third has a slowdown injected into one method and must exit 1 with a breach
line naming that trial and the metric. The gates are the nightly recipe's kind: a timing
gate on the paired speed-up that also needs a significant shift of the per-round ratios.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qatbench import registry
from qatbench.cli import app
from qatbench.errors import QatbenchError

pytestmark = pytest.mark.slow

# The nightly recipe's kind of gates: the timing gate is on the ratio to fp32 measured in the
# same process; absolute latency moves by more than 50% between identical runs on a shared
# machine (docs/nightly.md, "Nightly jobs").
GATES = ["--gate", "speedup_vs_fp32:-30%", "--gate", "mse:+20%", "--gate", "size_bytes:+1%"]
SLOW_TRIAL = "mlp-slowable-fp32-torch"


@pytest.fixture
def slowable() -> object:
    from data.slowable_method import SlowableMethod

    registry.methods.register("slowable", SlowableMethod)
    yield SlowableMethod
    registry.methods.unregister("slowable")


def _experiment(tmp_path: Path) -> Path:
    path = tmp_path / "nightly_small.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            schema_version: 1
            name: nightly_small
            models: [mlp]
            methods: [fp32, slowable]
            bits: [fp32]
            runtimes: [torch]
            data: {dataset: digits, calibration_samples: 64, eval_samples: 128}
            measure: {batch_sizes: [1], max_time_s: 0.6, min_rounds: 10, per_layer: false}
            """
        )
    )
    return path


def _run(tmp_path: Path, *extra: str) -> tuple[int, str]:
    args = [
        "run",
        str(_experiment(tmp_path)),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--output-dir",
        str(tmp_path / "reports"),
        *extra,
    ]
    result = CliRunner().invoke(app, args)
    if isinstance(result.exception, QatbenchError):  # as main() reports it
        return result.exception.exit_code, f"{result.output}error: {result.exception}"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.output


def test_nightly_gate_passes_unchanged_and_names_an_injected_slowdown(
    tmp_path: Path, slowable: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, output = _run(tmp_path, "--baseline", "previous", *GATES)
    assert code == 0, output
    assert "no sweep of 'nightly_small' before this one" in output

    code, output = _run(tmp_path, "--baseline", "previous", *GATES)
    assert code == 0, output
    assert "breach" not in output

    monkeypatch.setenv("QATBENCH_TEST_DELAY_MS", "3")
    code, output = _run(tmp_path, "--baseline", "previous", *GATES)
    assert code == 1, output
    breaches = [line for line in output.splitlines() if line.startswith("breach:")]
    assert breaches, output
    assert all(SLOW_TRIAL in line for line in breaches), breaches
    assert any("speedup_vs_fp32_b1" in line for line in breaches), breaches
    assert not any("mlp-fp32-fp32-torch" in line for line in breaches)


def test_baseline_can_be_a_report_json(
    tmp_path: Path, slowable: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QATBENCH_TEST_DELAY_MS", "3")
    code, output = _run(tmp_path)
    assert code == 0, output
    (first,) = (tmp_path / "reports").rglob("report.json")
    assert {t["id"] for t in json.loads(first.read_text())["trials"]} == {
        "mlp-fp32-fp32-torch",
        SLOW_TRIAL,
    }

    monkeypatch.delenv("QATBENCH_TEST_DELAY_MS")
    code, output = _run(tmp_path, "--baseline", str(first), *GATES)
    assert code == 0, output  # faster than the baseline: an improvement, not a breach
    assert "breach" not in output


def test_gate_without_baseline_is_bad_input(tmp_path: Path) -> None:
    code, output = _run(tmp_path, "--gate", "latency_p50_ms:+10%")
    assert code == 2
    assert "--gate: needs --baseline" in output


def test_unknown_baseline_is_a_one_line_error(tmp_path: Path, slowable: object) -> None:
    code, output = _run(tmp_path, "--baseline", str(tmp_path / "missing.json"))
    assert code == 2, output
    assert "missing.json" in output
