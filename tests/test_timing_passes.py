"""measure.passes: a trial timed in several worker processes across its sweep, pooled."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
from data.sweep_support import sqlite_uri

from qatbench.measure.latency_metrics import batch_metrics
from qatbench.measure.passes import pass_specs, pool
from qatbench.results import TrialFailure, TrialResult
from qatbench.spec.schema import validate_experiment
from qatbench.sweep.runner import run_experiment

EXPERIMENT = {
    "name": "passes",
    "models": [{"name": "mlp", "options": {"hidden": [32]}}],
    "methods": ["fp32"],
    "runtimes": ["torch"],
    "data": {"dataset": "synthetic", "eval_samples": 64, "calibration_samples": 32},
    "measure": {"batch_sizes": [1], "max_time_s": 0.6, "repeats": 4, "passes": 3},
}


def _trial():
    return validate_experiment(EXPERIMENT).expand()[0]


def test_each_pass_gets_a_share_of_the_budget_and_repeats() -> None:
    trial = _trial()
    specs = pass_specs(trial)
    assert len(specs) == 3 and all(s.id == trial.id for s in specs)
    assert {s.measure.passes for s in specs} == {1}
    assert [s.measure.max_time_s for s in specs] == pytest.approx([0.2] * 3)
    assert {s.measure.repeats for s in specs} == {2}  # ceil(4 / 3)
    assert [s.measure.per_layer for s in specs] == [True, False, False]
    single = replace(trial, measure=trial.measure.model_copy(update={"passes": 1}))
    assert pass_specs(single) == [single]


def _pass(trial, seed: int, level: float) -> TrialResult:
    """A finished pass: 2 repeats of 30 rounds at batch 1, fp32 ``level`` times slower."""
    rng = np.random.default_rng(seed)
    cand = (0.1 * rng.lognormal(0.0, 0.05, 60)).tolist()
    rounds = {
        "candidate_ms": cand,
        "fp32_ms": [c * level for c in cand],
        "repeat_of_round": [0] * 30 + [1] * 30,
        "speedup_per_repeat": [level, level],
    }
    metrics, _ = batch_metrics(1, rounds)
    return TrialResult(
        id=trial.id, model="mlp", method="fp32", bits="fp32", runtime="torch",
        status="finished", metrics={**metrics, "mse": 0.0},
        params={"measure": {"passes": 1}}, details={"latency_samples": {"b1": rounds}},
    )  # fmt: skip


def test_pooling_recomputes_timing_from_every_pass_and_keeps_the_rest() -> None:
    trial = _trial()
    passes = [_pass(trial, 1, 2.0), _pass(trial, 2, 2.0), _pass(trial, 3, 2.6)]
    pooled = pool(trial, passes)
    rounds = pooled.details["latency_samples"]["b1"]
    assert rounds["repeat_of_round"] == [r for r in range(6) for _ in range(30)]
    assert rounds["speedup_per_repeat"] == [2.0, 2.0, 2.0, 2.0, 2.6, 2.6]
    assert len(rounds["candidate_ms"]) == 180
    expected, _ = batch_metrics(1, rounds)
    assert {k: pooled.metrics[k] for k in expected} == expected
    assert 2.0 < pooled.metrics["speedup_vs_fp32_b1"] < 2.3  # 4 of 6 repeats at 2.0
    assert pooled.metrics["mse"] == 0.0
    assert pooled.params["measure"] == trial.measure.model_dump()
    assert pooled.details["passes"] == 3
    assert any("moved between 2.00 and 2.60" in w for w in pooled.details["warnings"])


def test_a_failed_pass_fails_the_trial() -> None:
    trial = _trial()
    failed = replace(_pass(trial, 2, 2.0), status="failed", error=TrialFailure("measure", "boom"))
    assert pool(trial, [_pass(trial, 1, 2.0), failed]) is failed


def test_a_sweep_with_passes_logs_one_pooled_result_per_trial(tmp_path: Path) -> None:
    exp = tmp_path / "passes.yaml"
    uri = sqlite_uri(tmp_path)
    exp.write_text(
        textwrap.dedent("""\
        name: passes
        models: [{name: mlp, options: {hidden: [32]}}]
        methods: [fp32, ptq]
        bits: [w8a8]
        runtimes: [torch]
        data: {dataset: synthetic, pretrain_epochs: 1, eval_samples: 64,
                calibration_samples: 32}
        measure: {batch_sizes: [1], max_time_s: 0.4, min_rounds: 6, warmup_s: 0.01,
                   repeats: 4, passes: 2}
        timeout_s: 120
        """)
    )
    outcome = run_experiment(exp, tracking_uri=uri, output_root=tmp_path / "reports")
    assert [t.status for t in outcome.record.trials] == ["finished", "finished"]
    report = json.loads(outcome.report_json.read_text())
    for trial in report["trials"]:
        rounds = trial["details"]["latency_samples"]["b1"]
        assert sorted(set(rounds["repeat_of_round"])) == [0, 1, 2, 3]  # 2 per pass
        assert trial["details"]["passes"] == 2
        assert trial["params"]["measure"]["passes"] == 2
        folder = outcome.report_json.parent / "trials" / trial["id"]
        assert (folder / "result.json").exists() and not (folder / "pass-1").exists()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["passes"], output_format="list")
    assert sorted(r.data.tags["qatbench.trial_id"] for r in runs) == sorted(
        t["id"] for t in report["trials"]
    )
