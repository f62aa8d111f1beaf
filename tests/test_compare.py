"""compare: gate parsing, pairing trials, significance-tested timing gates and the CLI.

Runs are built from a real trial's structure (``real_record``) with synthetic latency
samples: an injected 20% regression must breach a 5% gate, an A/A pair must not.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qatbench.errors import ConfigError
from qatbench.report.compare import (
    DEFAULT_METRICS,
    CompareResult,
    MetricChange,
    better_direction,
    compare,
    is_timing,
    parse_gate,
    parse_gates,
    relative_change,
)
from qatbench.report.compare_samples import timing_samples
from qatbench.results import RunRecord, TrialFailure, TrialResult

QATBENCH = Path(sys.executable).with_name("qatbench")


@pytest.fixture(scope="module")
def run_a(real_record: RunRecord, resample) -> RunRecord:
    return resample(real_record, seed=1)


@pytest.fixture(scope="module")
def regressed(run_a: RunRecord, resample) -> RunRecord:
    """B = A x 1.2 plus noise: a 20% latency regression."""
    return resample(run_a, seed=2, scale=1.2, base=run_a)


@pytest.fixture(scope="module")
def same(real_record: RunRecord, resample) -> RunRecord:
    """An independent run from the same distribution as A."""
    return resample(real_record, seed=3)


def _finished(record: RunRecord) -> TrialResult:
    return next(t for t in record.trials if t.ok)


def _change(result: CompareResult, metric: str) -> MetricChange:
    return next(c for c in result.trials[0].changes if c.metric == metric)


# --- gates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sign", "limit", "relative"),
    [
        ("latency_p50_ms_b1:+5%", 1, 0.05, True),
        ("throughput_per_s:-5%", -1, 0.05, True),
        ("accuracy:-0.5", -1, 0.5, False),
        ("mse:+10%", 1, 0.10, True),
        ("size_bytes:+0%", 1, 0.0, True),
        (" sqnr_db:-1.5 ", -1, 1.5, False),
        ("mse:+1e-3", 1, 0.001, False),
    ],
)
def test_gates_parse(text: str, sign: int, limit: float, relative: bool) -> None:
    gate = parse_gate(text)
    assert (gate.sign, gate.relative) == (sign, relative)
    assert gate.limit == pytest.approx(limit)
    assert gate.text == text.strip()


@pytest.mark.parametrize(
    "text",
    [
        "latency_p50_ms",
        "latency_p50_ms:5%",
        "latency_p50_ms:+",
        ":+5%",
        "latency:+abc%",
        "lat ency:+5%",
        "latency:++5%",
        "latency:+5%%",
        "latency:+-5%",
        "",
    ],
)
def test_bad_gates_are_one_line_config_errors(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_gates(["mse:+1%", text])
    message = str(info.value)
    assert "\n" not in message and "--gate" in message
    assert repr(text.strip()) in message or repr(text) in message


def test_gates_match_names_families_and_globs() -> None:
    family = parse_gate("latency_p50_ms:+5%")
    assert family.matches("latency_p50_ms_b1") and family.matches("latency_p50_ms_b64")
    assert family.matches("latency_p50_ms") and not family.matches("latency_p90_ms_b1")
    assert not family.matches("fp32_latency_p50_ms_b1")
    exact = parse_gate("latency_p50_ms_b1:+5%")
    assert exact.matches("latency_p50_ms_b1") and not exact.matches("latency_p50_ms_b16")
    glob = parse_gate("latency_p9?_ms_b*:+5%")
    assert glob.matches("latency_p90_ms_b1") and glob.matches("latency_p99_ms_b64")


def test_gate_directions_and_absolute_limits() -> None:
    rise, fall, drop = parse_gate("m:+5%"), parse_gate("m:-5%"), parse_gate("accuracy:-0.5")
    assert rise.exceeded(1.0, 1.06) and not rise.exceeded(1.0, 1.04)
    assert not rise.exceeded(1.0, 0.5)  # an improvement is no breach
    assert fall.exceeded(100.0, 94.0) and not fall.exceeded(100.0, 96.0)
    assert drop.exceeded(98.4, 97.8) and not drop.exceeded(98.4, 98.0)


def test_relative_change_from_zero() -> None:
    assert relative_change(0.0, 0.0) == 0.0
    assert relative_change(0.0, 1e-9) == math.inf
    assert relative_change(-2.0, -1.0) == pytest.approx(0.5)


def test_timing_metrics_and_their_samples(run_a: RunRecord) -> None:
    trial = _finished(run_a)
    assert all(
        is_timing(m)
        for m in (
            "latency_p50_ms_b1",
            "throughput_per_s_b4",
            "speedup_vs_fp32_b1",
            "fp32_latency_p50_ms_b4",
        )
    )
    assert not any(is_timing(m) for m in ("latency_cv_b1", "mse", "size_bytes"))
    latency, up = timing_samples(trial, "latency_p50_ms_b1")
    throughput, down = timing_samples(trial, "throughput_per_s_b1")
    speedup, _ = timing_samples(trial, "speedup_vs_fp32_b1")
    bucket = trial.details["latency_samples"]["b1"]
    assert latency == throughput == bucket["candidate_ms"] and (up, down) == (1, -1)
    assert speedup[0] == pytest.approx(bucket["fp32_ms"][0] / bucket["candidate_ms"][0])
    assert timing_samples(trial, "latency_p50_ms_b999") == ([], 0)


# --- comparing runs -------------------------------------------------------------------


def test_injected_20_percent_regression_breaches(run_a, regressed) -> None:
    result = compare(run_a, regressed, parse_gates(["latency_p50_ms:+5%", "mse:+10%"]))
    assert not result.ok
    trial = _finished(run_a).id
    lines = result.breaches
    assert {line.split(" ")[1] for line in lines} == {"latency_p50_ms_b1", "latency_p50_ms_b4"}
    assert all(
        line.startswith(f"{trial}: ") and "breaches latency_p50_ms:+5%" in line for line in lines
    )
    change = _change(result, "latency_p50_ms_b1")
    assert change.verdict == "breach" and change.test is not None
    assert change.test.significant and change.test.ratio == pytest.approx(1.2, rel=0.05)
    assert change.relative == pytest.approx(0.2, abs=0.05)


def test_throughput_and_speedup_gates_see_the_regression_as_a_drop(run_a, regressed) -> None:
    result = compare(run_a, regressed, parse_gates(["throughput_per_s:-5%", "speedup_vs_fp32:-5%"]))
    breached = {c.metric for c in result.trials[0].changes if c.verdict == "breach"}
    assert breached == {
        "throughput_per_s_b1",
        "throughput_per_s_b4",
        "speedup_vs_fp32_b1",
        "speedup_vs_fp32_b4",
    }
    # the other direction holds: B is not faster
    assert compare(run_a, regressed, parse_gates(["throughput_per_s:+5%"])).ok


def test_an_a_a_pair_holds(run_a, same) -> None:
    result = compare(
        run_a,
        same,
        parse_gates(
            ["latency_p50_ms:+5%", "latency_p90_ms:+5%", "throughput_per_s:-5%", "accuracy:-0.5"]
        ),
    )
    assert result.ok, result.breaches
    tests = [c.test for c in result.trials[0].changes if c.test is not None]
    assert tests and not any(t.significant for t in tests)


def test_a_change_past_the_threshold_without_a_significant_shift_is_noise(run_a, same) -> None:
    trial = _finished(same)
    metrics = {**trial.metrics, "latency_p50_ms_b1": trial.metrics["latency_p50_ms_b1"] * 1.3}
    noisy = replace(same, trials=(replace(trial, metrics=metrics), *same.trials[1:]))
    result = compare(run_a, noisy, parse_gates(["latency_p50_ms_b1:+5%"]))
    assert result.ok
    assert _change(result, "latency_p50_ms_b1").verdict == "noise"


def test_a_significant_shift_within_the_gate_holds(run_a, regressed) -> None:
    result = compare(run_a, regressed, parse_gates(["latency_p50_ms:+50%"]))
    change = _change(result, "latency_p50_ms_b1")
    assert result.ok and change.verdict == "held" and change.test.significant


def test_min_effect_and_alpha_are_honoured(run_a, regressed) -> None:
    gates = parse_gates(["latency_p50_ms:+5%"])
    assert compare(run_a, regressed, gates, min_effect=0.5).ok  # a 20% shift is below 50%
    with pytest.raises(ConfigError, match="--alpha"):
        compare(run_a, regressed, gates, alpha=1.5)


def test_without_samples_the_threshold_decides_and_says_so(run_a, regressed) -> None:
    def strip(record: RunRecord) -> RunRecord:
        return replace(record, trials=tuple(replace(t, details={}) for t in record.trials))

    result = compare(strip(run_a), strip(regressed), parse_gates(["latency_p50_ms_b1:+5%"]))
    assert not result.ok and _change(result, "latency_p50_ms_b1").test is None
    assert result.notes and "latency_p50_ms_b1" in result.notes[0]


def test_quality_gates_are_direction_aware(run_a: RunRecord) -> None:
    trial = _finished(run_a)
    worse = {
        **trial.metrics,
        "accuracy": trial.metrics["accuracy"] - 1.0,
        "mse": trial.metrics["mse"] * 1.2,
    }
    better = {
        **trial.metrics,
        "accuracy": trial.metrics["accuracy"] + 1.0,
        "mse": trial.metrics["mse"] * 0.5,
    }
    gates = parse_gates(["accuracy:-0.5", "mse:+10%"])
    for metrics, expected in ((worse, {"accuracy", "mse"}), (better, set())):
        b = replace(run_a, trials=(replace(trial, metrics=metrics), *run_a.trials[1:]))
        result = compare(run_a, b, gates)
        assert {c.metric for c in result.trials[0].changes if c.verdict == "breach"} == expected


@pytest.mark.parametrize(
    ("metric", "direction"),
    [
        ("perplexity", -1),
        ("perplexity_delta_vs_fp32", -1),
        ("bits_per_token", -1),
        ("next_token_accuracy", 1),
        ("next_token_accuracy_delta_vs_fp32", 1),
        ("prefill_latency_p50_ms", -1),
        ("decode_latency_p50_ms_per_token", -1),
        ("prefill_tokens_per_s", 1),
        ("decode_tokens_per_s", 1),
        ("recompute_decode_tokens_per_s", 1),
        ("recompute_decode_latency_p50_ms_per_token", -1),
        ("decode_speedup_vs_fp32", 1),
        ("kv_cache_bytes", -1),
        ("weights_plus_kv_cache_bytes", -1),
        ("greedy_prefix_match_fraction", 1),
        ("onnx_parity_ok", 1),
        ("onnx_parity_max_abs", -1),
        ("latency_cv_b1", 0),
    ],
)
def test_language_model_metrics_have_a_direction(metric: str, direction: int) -> None:
    assert better_direction(metric) == direction


def test_language_model_gates_breach_on_a_worse_model(run_a: RunRecord) -> None:
    trial = _finished(run_a)
    lm = {"perplexity": 6.80, "next_token_accuracy": 47.8, "decode_tokens_per_s": 900.0}
    a = replace(run_a, trials=(replace(trial, metrics={**trial.metrics, **lm}),))
    worse = {"perplexity": 7.10, "next_token_accuracy": 46.9, "decode_tokens_per_s": 600.0}
    b = replace(run_a, trials=(replace(trial, metrics={**trial.metrics, **worse}),))
    gates = parse_gates(["perplexity:+2%", "next_token_accuracy:-0.5", "decode_tokens_per_s:-10%"])
    result = compare(a, b, gates)
    assert {c.metric for c in result.trials[0].changes if c.verdict == "breach"} == set(lm)
    assert compare(b, a, gates).breaches == []  # the better direction never breaches
    shown = {c.metric for c in compare(a, b, []).trials[0].changes}
    assert set(lm) <= shown and set(lm) <= set(DEFAULT_METRICS)


def _generation_trial(trial: TrialResult, decode_ms: float, seed: int) -> TrialResult:
    """``trial`` with 40 paired prefill and decode rounds and the metrics they give."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def rounds(ms: float) -> list[float]:
        return (ms * rng.lognormal(0, 0.05, 40)).tolist()

    samples = {
        "prefill": {"candidate_ms": rounds(4.0), "fp32_ms": rounds(5.0)},
        "decode": {"candidate_ms": rounds(decode_ms), "fp32_ms": rounds(40.0)},
    }
    median = sorted(samples["decode"]["candidate_ms"])[20]
    metrics = {
        **trial.metrics,
        "prefill_latency_p50_ms": sorted(samples["prefill"]["candidate_ms"])[20],
        "decode_tokens_per_s": 32 * 1000.0 / median,
        "decode_latency_p50_ms_per_token": median / 32,
    }
    details = {**trial.details, "generation": {"decode_mode": "kv_cache", "samples": samples}}
    return replace(trial, metrics=metrics, details=details)


def test_generation_timings_are_shift_tested_on_their_rounds(run_a: RunRecord) -> None:
    trial = _finished(run_a)
    a = replace(run_a, trials=(_generation_trial(trial, 30.0, seed=1),))
    slower = replace(run_a, trials=(_generation_trial(trial, 36.0, seed=2),))
    same = replace(run_a, trials=(_generation_trial(trial, 30.0, seed=3),))
    samples, move = timing_samples(a.trials[0], "decode_tokens_per_s")
    assert len(samples) == 40 and move == -1 and is_timing("decode_tokens_per_s")
    assert timing_samples(a.trials[0], "prefill_speedup_vs_fp32")[1] == 1
    gates = parse_gates(["decode_tokens_per_s:-5%", "decode_latency_p50_ms_per_token:+5%"])
    result = compare(a, slower, gates)
    breached = {c.metric for c in result.trials[0].changes if c.verdict == "breach"}
    assert breached == {"decode_tokens_per_s", "decode_latency_p50_ms_per_token"}
    assert all(c.test is not None for c in result.trials[0].changes if c.gates)
    assert compare(a, same, gates).breaches == []
    # a bare threshold would be fooled: move B's median past the gate without its rounds
    jumped = replace(
        same.trials[0], metrics={**same.trials[0].metrics, "decode_tokens_per_s": 900.0}
    )
    noisy = compare(a, replace(same, trials=(jumped,)), gates[:1])
    assert _change(noisy, "decode_tokens_per_s").verdict == "noise" and noisy.breaches == []


def _with_spells(record: RunRecord, levels: list[float], seed: int) -> RunRecord:
    """The record's first finished trial timed in 8 repeats of 80 rounds at batch 1, the
    fp32/candidate ratio of repeat r being levels[r] (a busy spell moves a whole repeat)."""
    rng = np.random.default_rng(seed)
    cand, base, labels = [], [], []
    for r, level in enumerate(levels):
        c = 0.1 * rng.lognormal(0.0, 0.05, 80)
        cand += c.tolist()
        base += (c * level * rng.lognormal(0.0, 0.05, 80)).tolist()
        labels += [r] * 80
    trial = _finished(record)
    bucket = {"candidate_ms": cand, "fp32_ms": base, "repeat_of_round": labels}
    metrics = {**trial.metrics, "speedup_vs_fp32_b1": float(np.median(base) / np.median(cand))}
    trial = replace(trial, metrics=metrics, details={"latency_samples": {"b1": bucket}})
    return replace(record, trials=[trial])


def _without_repeats(record: RunRecord) -> RunRecord:
    trial = record.trials[0]
    bucket = dict(trial.details["latency_samples"]["b1"])
    del bucket["repeat_of_round"]
    return replace(record, trials=[replace(trial, details={"latency_samples": {"b1": bucket}})])


def test_repeats_are_the_unit_a_busy_spell_cannot_fake_a_regression(run_a) -> None:
    # The same two machine states, 2.0 and 1.6, in another mix: 3 busy repeats of 8 in A,
    # 5 in B. Thousands of rounds make that "significant"; 8 repeats against 8 do not.
    gate = parse_gates(["speedup_vs_fp32_b1:-5%"])
    a = _with_spells(run_a, [2.0] * 5 + [1.6] * 3, seed=1)
    b = _with_spells(run_a, [2.0] * 3 + [1.6] * 5, seed=2)
    busier = _change(compare(a, b, gate), "speedup_vs_fp32_b1")
    assert busier.relative is not None and busier.relative < -0.05
    assert busier.verdict == "noise" and busier.test is not None
    assert not busier.test.significant
    by_round = _change(compare(_without_repeats(a), _without_repeats(b), gate), busier.metric)
    assert by_round.verdict == "breach"  # what the per-round test said of the same data
    slower = _with_spells(run_a, [1.3] * 8, seed=3)  # every repeat slower: a regression
    regression = _change(compare(a, slower, gate), busier.metric)
    assert regression.verdict == "breach" and regression.test is not None
    assert regression.test.p_value < 0.01


def test_unpaired_and_newly_failed_trials(run_a: RunRecord, same: RunRecord) -> None:
    trial = _finished(same)
    failed = replace(
        trial, status="failed", metrics={}, details={}, error=TrialFailure("convert", "no kernel")
    )
    extra = replace(trial, id="other-fp32-fp32-torch")
    b = replace(same, trials=(failed, extra))
    result = compare(run_a, b, parse_gates(["latency_p50_ms:+5%"]))
    assert result.only_a == tuple(t.id for t in run_a.trials[1:])
    assert result.only_b == ("other-fp32-fp32-torch",)
    assert result.breaches == [f"{trial.id}: finished in A but failed in B (convert: no kernel)"]
    assert {c.verdict for c in result.trials[0].changes if c.gates} == {"missing"}


def test_a_gate_matching_nothing_is_a_config_error(run_a, same) -> None:
    with pytest.raises(ConfigError, match=r"'latncy_p50_ms'.*metrics reported: .*latency_p50_ms"):
        compare(run_a, same, parse_gates(["latncy_p50_ms:+5%"]))


def test_runs_without_a_common_trial_are_a_config_error(run_a, same) -> None:
    renamed = replace(same, trials=tuple(replace(t, id=f"x{t.id}") for t in same.trials))
    with pytest.raises(ConfigError, match="no trial id in common"):
        compare(run_a, renamed, ())


# --- the command line -----------------------------------------------------------------


def qatbench(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(QATBENCH), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "120"},
    )


def test_cli_exits_1_naming_each_breach(run_a, regressed, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    run_a.save(a)
    regressed.save(b)
    html = tmp_path / "compare.html"
    proc = qatbench(
        "compare", a, b, "--gate", "latency_p50_ms:+5%", "--gate", "accuracy:-0.5", "-o", html
    )
    assert proc.returncode == 1, proc.stderr
    trial = _finished(run_a).id
    breaches = [line for line in proc.stderr.splitlines() if line.startswith("breach: ")]
    assert [line.split(" ")[1:3] for line in breaches] == [
        [f"{trial}:", "latency_p50_ms_b1"],
        [f"{trial}:", "latency_p50_ms_b4"],
    ]
    assert "BREACH" in proc.stdout and "only in" not in proc.stdout
    page = html.read_text()
    assert "breach" in page and "<script>alert" not in page


def test_cli_exits_0_on_an_a_a_pair(run_a, same, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    run_a.save(a)
    same.save(b)
    proc = qatbench("compare", a, b, "--gate", "latency_p50_ms:+5%", "-g", "mse:+10%")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every gate held" in proc.stdout and proc.stderr == ""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--gate", "latency_p50_ms=+5%"], "--gate 'latency_p50_ms=+5%'"),
        (["--gate", "nonsense_metric:+5%"], "no trial of either run reports"),
        (["--alpha", "0"], "--alpha 0.0"),
    ],
)
def test_cli_bad_input_is_one_error_line(run_a, tmp_path: Path, args, fragment) -> None:
    a = tmp_path / "a.json"
    run_a.save(a)
    proc = qatbench("compare", a, a, *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert fragment in proc.stderr


def test_cli_missing_report_is_one_error_line(tmp_path: Path) -> None:
    proc = qatbench("compare", tmp_path / "nope.json", tmp_path / "nope.json")
    assert proc.returncode == 2 and "no such report" in proc.stderr
    assert proc.stderr.count("\n") == 1
