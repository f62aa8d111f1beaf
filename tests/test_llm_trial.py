"""Language-model trials end to end in-process: a tiny GPT pretrained on the shipped corpus,
perplexity against fp32, and generation metrics on both runtimes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from data.trial_support import run_here

from qatbench import registry
from qatbench.measure import generation as gen
from qatbench.measure.timing import TimingSettings
from qatbench.models.gpt import build_gpt_tiny
from qatbench.results import TrialResult
from qatbench.spec.schema import load_experiment, validate_experiment

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW = 8, 8
LAYERS, WIDTH = 2, 64


def llm_experiment(methods: list[Any]) -> dict[str, Any]:
    """gpt_tiny at context 32, one pretraining epoch on the corpus, short timing rounds."""
    return {
        "name": "tiny_llm",
        "models": [{"name": "gpt_tiny", "options": {"context": 32}}],
        "methods": methods,
        "bits": ["w8a8"],
        "runtimes": ["torch", "onnxruntime"],
        "data": {
            "dataset": "text",
            "seq_len": 32,
            "pretrain_epochs": 1,
            "batch_size": 32,
            "eval_samples": 16,
            "calibration_samples": 16,
        },
        "measure": {
            "batch_sizes": [1],
            "max_time_s": 0.1,
            "min_rounds": 3,
            "warmup_s": 0.01,
            "per_layer": False,
            "generation": {"prompt_tokens": PROMPT, "new_tokens": NEW},
        },
    }


def _methods() -> list[Any]:
    methods: list[Any] = ["fp32", "ptq"]
    if "gptq" in registry.methods:
        methods.append({"name": "gptq", "bits": ["w4"], "options": {"group_size": 32}})
    return methods


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TrialResult]]:
    cache = tmp_path_factory.mktemp("qatbench-cache")
    out = tmp_path_factory.mktemp("trials")
    experiment = llm_experiment(_methods())
    if "gptq" in registry.methods:  # int4 on torch is enough here; ptq covers onnxruntime
        experiment["exclude"] = [{"method": "gptq", "runtime": "onnxruntime"}]
    trials = {t.id: t for t in validate_experiment(experiment, "t").expand()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QATBENCH_CACHE", str(cache))
        yield {tid: run_here(trial, out / tid) for tid, trial in trials.items()}


def test_every_trial_finishes_with_perplexity(results: dict[str, TrialResult]) -> None:
    assert "gpt_tiny-fp32-fp32-torch" in results and "gpt_tiny-ptq-w8a8-onnxruntime" in results
    for tid, r in results.items():
        assert r.status == "finished", (tid, r.error, r.details.get("traceback"))
        for name in ("perplexity", "next_token_accuracy", "bits_per_token"):
            for suffix in ("", "_fp32", "_delta_vs_fp32"):
                assert name + suffix in r.metrics, (tid, name + suffix)
        # one epoch on the corpus: far better than the 256 of a uniform guess
        assert r.metrics["perplexity_fp32"] < 40, tid


def test_pretrained_once_then_from_the_cache(results: dict[str, TrialResult]) -> None:
    hits = [r.details.get("pretrained_from_cache") for r in results.values()]
    assert hits.count(False) == 1 and hits.count(True) == len(hits) - 1


def test_fp32_is_its_own_reference(results: dict[str, TrialResult]) -> None:
    m = results["gpt_tiny-fp32-fp32-torch"].metrics
    assert m["perplexity_delta_vs_fp32"] == 0.0
    assert m["greedy_prefix_match_fraction"] == 1.0
    assert results["gpt_tiny-fp32-fp32-onnxruntime"].metrics["onnx_parity_max_abs"] < 1e-3


def test_int8_keeps_perplexity_close(results: dict[str, TrialResult]) -> None:
    for runtime in ("torch", "onnxruntime"):
        m = results[f"gpt_tiny-ptq-w8a8-{runtime}"].metrics
        assert abs(m["perplexity_delta_vs_fp32"]) < 0.1 * m["perplexity_fp32"]


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_decode_with_kv_cache_on_both_runtimes(
    results: dict[str, TrialResult], runtime: str
) -> None:
    for tid, r in results.items():
        if not tid.endswith(runtime):
            continue
        m, details = r.metrics, r.details["generation"]
        assert details["decode_mode"] == "kv_cache", tid
        assert details["prompt_tokens"] == PROMPT and details["new_tokens"] == NEW
        assert m["decode_tokens_per_s"] > 0 and m["prefill_latency_p50_ms"] > 0
        assert m["decode_latency_p50_ms_per_token"] == pytest.approx(1e3 / m["decode_tokens_per_s"])
        assert m["decode_speedup_ci_low"] <= m["decode_speedup_vs_fp32"]
        assert m["decode_speedup_vs_fp32"] <= m["decode_speedup_ci_high"]
        assert m["kv_cache_bytes"] == 2 * LAYERS * WIDTH * (PROMPT + NEW) * 4
        assert m["weights_plus_kv_cache_bytes"] == m["weight_bytes"] + m["kv_cache_bytes"]
        assert 0 <= m["greedy_prefix_match_fraction"] <= 1
        assert "recompute_decode_tokens_per_s" not in m
        # the rounds behind the medians, for compare's shift tests
        decode = details["samples"]["decode"]
        assert len(decode["candidate_ms"]) == len(decode["fp32_ms"]) >= 3
        median = sorted(decode["candidate_ms"])[len(decode["candidate_ms"]) // 2]
        assert NEW * 1e3 / median == pytest.approx(m["decode_tokens_per_s"], rel=0.5)
        assert set(details["samples"]) == {"prefill", "decode"}


def test_weight_only_int4_shrinks_the_weights(results: dict[str, TrialResult]) -> None:
    if "gpt_tiny-gptq-w4-torch" not in results:
        pytest.skip("method gptq is not registered")
    fp32 = results["gpt_tiny-fp32-fp32-torch"].metrics
    gptq = results["gpt_tiny-gptq-w4-torch"].metrics
    assert gptq["size_bytes"] < 0.5 * fp32["size_bytes"]
    assert gptq["perplexity_delta_vs_fp32"] < 0.5 * fp32["perplexity_fp32"]


def test_without_a_decode_graph_onnxruntime_recomputes_and_says_so(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_gpt_tiny(context=32)
    model.eval()
    tokens = torch.randint(0, 256, (1, 32))

    def broken_export(*_args: Any) -> Path:
        raise RuntimeError("this method exports one graph only")

    notes: list[str] = []
    decoder = gen.graph_decoder(
        model,
        tokens[:, :PROMPT],
        tokens,
        NEW,
        broken_export,
        lambda p: None,
        model,
        tmp_path,
        notes,
    )
    assert decoder.mode == gen.RECOMPUTE
    assert "recompute" in notes[0] and "exports one graph only" in notes[0]
    settings = TimingSettings(warmup_s=0.0, min_rounds=3, max_time_s=0.05)
    result = gen.measure_generation(model, decoder, tokens, PROMPT, NEW, settings, 1000.0)
    m = result.metrics
    assert m["recompute_decode_tokens_per_s"] > 0
    assert "decode_tokens_per_s" not in m and "decode_speedup_vs_fp32" not in m
    assert m["kv_cache_bytes"] == 0 and m["weights_plus_kv_cache_bytes"] == 1000.0
    assert "greedy_prefix_match_fraction" not in m  # its window is not the prompt
    assert result.details["recompute_window_tokens"] == 32


def test_the_llm_experiment_validates() -> None:
    spec = load_experiment(ROOT / "experiments" / "llm.yaml")
    ids = {t.id for t in spec.expand()}
    assert spec.data.dataset == "text"
    for runtime in ("torch", "onnxruntime"):
        assert f"gpt_small-fp32-fp32-{runtime}" in ids
        for method, bits in (("rtn", "w4"), ("gptq", "w4"), ("qat", "w4a8"), ("ptq", "w4a8")):
            assert f"gpt_small-{method}-{bits}-{runtime}" in ids
