"""The pick (qatbench/report/pick.py): the best trial within a quality budget per model,
runtime and batch size; ``budget:`` validated at load; ``qatbench pick`` over reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from qatbench.errors import ConfigError
from qatbench.measure.directions import better_direction
from qatbench.report.pick import Budget, parse_budget_args, pick, with_picks
from qatbench.results import RunRecord, TrialResult
from qatbench.spec.schema import validate_experiment

QATBENCH = Path(sys.executable).with_name("qatbench")
SCHEMA = Path(__file__).resolve().parents[1] / "qatbench" / "report" / "report.schema.json"


def trial(
    method: str,
    bits: str,
    *,
    speedup: float,
    half_ci: float = 0.05,
    acc_delta: float = 0.0,
    sqnr: float = 30.0,
    runtime: str = "torch",
    model: str = "mlp",
    size: float = 1e6,
    ok: bool = True,
) -> TrialResult:
    return TrialResult(
        id=f"{model}-{method}-{bits}-{runtime}",
        model=model,
        method=method,
        bits=bits,
        runtime=runtime,
        status="finished" if ok else "failed",
        metrics={
            "speedup_vs_fp32_b1": speedup,
            "speedup_ci_low_b1": speedup - half_ci,
            "speedup_ci_high_b1": speedup + half_ci,
            "accuracy_delta_vs_fp32": acc_delta,
            "sqnr_db": sqnr,
            "size_bytes": size,
        },
    )


BUDGET = Budget.from_mapping({"accuracy_delta_vs_fp32": -1.0})


def test_directions_of_quality_metrics_and_their_deltas() -> None:
    assert better_direction("accuracy_delta_vs_fp32") == 1
    assert better_direction("perplexity_delta_vs_fp32") == -1
    assert better_direction("cosine") == 1
    assert better_direction("mse") == -1
    assert better_direction("latency_cv_b1") == 0
    assert better_direction("my_score_delta_vs_fp32", {"my_score": -1}) == -1


def test_fastest_within_budget_wins_over_a_faster_trial_outside_it() -> None:
    trials = [
        trial("fp32", "fp32", speedup=1.0),
        trial("ptq", "w8a8", speedup=2.0, acc_delta=-0.2),
        trial("ptq", "w2a8", speedup=3.0, acc_delta=-11.0),
    ]
    (p,) = pick(trials, BUDGET)
    assert p.trial_id == "mlp-ptq-w8a8-torch"
    assert (p.batch_size, p.value, p.ci_low, p.ci_high) == (1, 2.0, 1.95, 2.05)
    assert not p.tied_with


def test_a_tie_in_speed_goes_to_the_better_quality_and_says_so() -> None:
    trials = [
        trial("ptq", "w8a8", speedup=2.0, half_ci=0.3, acc_delta=-0.1),
        trial("ptq", "w3a8", speedup=2.1, half_ci=0.3, acc_delta=-0.9),
        trial("ptq", "w4a8", speedup=1.0, half_ci=0.1, acc_delta=0.0),
    ]
    (p,) = pick(trials, BUDGET)
    assert p.trial_id == "mlp-ptq-w8a8-torch"
    assert p.tied_with == ("mlp-ptq-w3a8-torch",)
    assert "not significantly different" in p.why


def test_a_significantly_faster_trial_wins_despite_worse_quality() -> None:
    trials = [
        trial("ptq", "w8a8", speedup=2.0, half_ci=0.05, acc_delta=-0.1),
        trial("ptq", "w3a8", speedup=2.5, half_ci=0.05, acc_delta=-0.9),
    ]
    (p,) = pick(trials, BUDGET)
    assert p.trial_id == "mlp-ptq-w3a8-torch"


def test_groups_by_model_runtime_and_batch_and_skips_failed_trials() -> None:
    trials = [
        trial("ptq", "w8a8", speedup=2.0),
        trial("ptq", "w8a8", speedup=1.5, runtime="onnxruntime"),
        trial("ptq", "w8a8", speedup=1.7, model="tiny"),
        trial("ptq", "w4a8", speedup=9.0, ok=False),
    ]
    picks = pick(trials, BUDGET)
    assert [(p.model, p.runtime, p.trial_id) for p in picks] == [
        ("mlp", "onnxruntime", "mlp-ptq-w8a8-onnxruntime"),
        ("mlp", "torch", "mlp-ptq-w8a8-torch"),
        ("tiny", "torch", "tiny-ptq-w8a8-torch"),
    ]


def test_nothing_within_budget_names_the_closest() -> None:
    trials = [
        trial("ptq", "w3a8", speedup=2.0, acc_delta=-1.8),
        trial("ptq", "w2a8", speedup=3.0, acc_delta=-11.0),
    ]
    (p,) = pick(trials, BUDGET)
    assert p.trial_id is None
    assert p.closest == "mlp-ptq-w3a8-torch"
    assert p.closest_misses == ("accuracy_delta_vs_fp32 >= -1 (-1.8)",)


def test_pick_by_size_minimises() -> None:
    trials = [
        trial("ptq", "w8a8", speedup=2.0, size=4e5),
        trial("ptq", "w4a8", speedup=1.0, size=2e5),
    ]
    (p,) = pick(trials, Budget(), by="size")
    assert p.trial_id == "mlp-ptq-w4a8-torch"


def test_budget_arguments_parse_or_fail_with_one_line() -> None:
    assert parse_budget_args(["cosine:0.995", "accuracy_delta_vs_fp32:-1"]) == {
        "cosine": 0.995,
        "accuracy_delta_vs_fp32": -1.0,
    }
    with pytest.raises(ConfigError, match="--budget 'cosine'"):
        parse_budget_args(["cosine"])


# --- budget: in the experiment --------------------------------------------------------


def doc(**extra: Any) -> dict[str, Any]:
    return {"name": "unit", "models": ["mlp"], "methods": ["fp32", "ptq"], **extra}


def test_budget_and_pick_by_validate() -> None:
    spec = validate_experiment(doc(budget={"accuracy_delta_vs_fp32": -1, "cosine": 0.995}))
    assert spec.budget == {"accuracy_delta_vs_fp32": -1.0, "cosine": 0.995}
    assert spec.pick_by == "speedup"


@pytest.mark.parametrize(
    ("budget", "needles"),
    [
        ({"acuracy": 90}, ["budget.acuracy", "accuracy_delta_vs_fp32"]),
        ({"cosine": "high"}, ["budget.cosine"]),
        ({"cosine": True}, ["budget.cosine"]),
        ({"cosine": float("nan")}, ["budget.cosine", "finite"]),
    ],
)
def test_a_bad_budget_is_one_line_naming_file_and_key(
    budget: dict[str, Any], needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        validate_experiment(doc(budget=budget), source="exp.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("exp.yaml: ")
    for needle in needles:
        assert needle in message


# --- report.json and qatbench pick ----------------------------------------------------


def record(trials: list[TrialResult], budget: dict[str, float]) -> RunRecord:
    spec = {"budget": budget, "pick_by": "speedup"}
    return RunRecord(
        experiment={"name": "unit", "spec": spec},
        created="2026-01-01T00:00:00+00:00",
        env={},
        trials=tuple(trials),
    )


def test_picks_are_in_report_json_and_match_its_schema(tmp_path: Path) -> None:
    trials = [trial("ptq", "w8a8", speedup=2.0), trial("ptq", "w2a8", speedup=3.0, acc_delta=-11)]
    rec = with_picks(record(trials, {"accuracy_delta_vs_fp32": -1.0}))
    rec.save(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    assert [p["trial_id"] for p in data["picks"]] == ["mlp-ptq-w8a8-torch"]
    assert RunRecord.load(tmp_path / "report.json").picks == rec.picks


def _pick_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "PATH": str(QATBENCH.parent)}
    return subprocess.run(
        [str(QATBENCH), "pick", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_pick_command_prints_picks_and_exits_1_naming_the_closest(tmp_path: Path) -> None:
    trials = [
        trial("ptq", "w8a8", speedup=2.0, acc_delta=-0.5),
        trial("ptq", "w2a8", speedup=3.0, acc_delta=-11),
    ]
    path = tmp_path / "report.json"
    record(trials, {"accuracy_delta_vs_fp32": -1.0}).save(path)
    ok = _pick_cli(str(path))
    assert ok.returncode == 0, ok.stderr
    assert "mlp-ptq-w8a8-torch" in ok.stdout
    strict = _pick_cli(str(path), "--budget", "accuracy_delta_vs_fp32:-0.1")
    assert strict.returncode == 1
    assert "no trial within budget; closest: mlp-ptq-w8a8-torch" in strict.stdout
    bad = _pick_cli(str(path), "--budget", "acuracy:1")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "--budget acuracy" in bad.stderr


def test_report_html_shows_the_picks_first(tmp_path: Path) -> None:
    from qatbench.report.html import write_html

    trials = [
        trial("fp32", "fp32", speedup=1.0),
        trial("ptq", "w8a8", speedup=2.0),
        trial("ptq", "w3a8", speedup=2.0, acc_delta=-3, runtime="onnxruntime"),
    ]
    rec = with_picks(record(trials, {"accuracy_delta_vs_fp32": -1.0}))
    html = write_html(rec, tmp_path / "report.html").read_text()
    card = html[html.index('id="picks"') : html.index('class="model"')]
    assert "mlp-ptq-w8a8-torch" in card
    assert "none within budget" in card and "closest: mlp-ptq-w3a8-onnxruntime" in card
