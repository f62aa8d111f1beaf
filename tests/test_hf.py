"""Hugging Face causal LMs built offline: GPT-2 from a config, Conv1D turned into Linear,
a local checkpoint directory, weight-only methods, ONNX export and generation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qatbench import registry
from qatbench.data.tasks import LanguageModelling
from qatbench.data.text import load_text
from qatbench.data.training import forward_loop
from qatbench.errors import ConfigError
from qatbench.measure.generation import HfCacheDecoder
from qatbench.models.hf import HfCausalLM, build_hf_causal_lm, conv1d_to_linear
from qatbench.quant.bitwidth import BitWidth
from qatbench.runtimes.onnx_export import check_onnx
from qatbench.spec.schema import validate_experiment
from qatbench.trial.lifecycle import run_trial

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face models need the optional extra: pip install '.[llm]'"
)

GPT2 = {
    "model_type": "gpt2",
    "vocab_size": 256,
    "n_positions": 64,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 2,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


@pytest.fixture
def gpt2() -> HfCausalLM:
    torch.manual_seed(0)
    model, example = build_hf_causal_lm(hf_config=GPT2, seq_len=32)
    assert isinstance(model, HfCausalLM) and example[0].shape == (1, 32)
    return model.eval()


def test_gpt2_conv1d_layers_become_equal_linear_layers() -> None:
    config = transformers.AutoConfig.for_model(**GPT2)
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(config).eval()
    converted = copy.deepcopy(original)
    assert conv1d_to_linear(converted) == 2 * 4
    names = {type(m).__name__ for m in converted.modules()}
    assert "Conv1D" not in names
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, original(x).logits)


def test_every_projection_and_the_head_are_linear(gpt2: HfCausalLM) -> None:
    linears = [n for n, m in gpt2.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 1 and linears[-1].endswith("lm_head")
    assert gpt2(torch.zeros(3, 32, dtype=torch.long)).shape == (3, 32, 256)


def test_a_local_checkpoint_directory_loads_offline(gpt2: HfCausalLM, tmp_path: Path) -> None:
    config = transformers.AutoConfig.for_model(**GPT2)
    original = transformers.AutoModelForCausalLM.from_config(config).eval()
    original.save_pretrained(tmp_path / "ckpt")
    loaded, example = build_hf_causal_lm(hf=str(tmp_path / "ckpt"))
    assert example[0].shape == (1, 64)  # the context, at most 128
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x).logits)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one"),
        ({"hf": "x", "hf_config": GPT2}, "exactly one"),
        ({"hf": "/nonexistent/checkpoint"}, "not a local directory"),
        ({"hf_config": {"n_layer": 1}}, "model_type"),
        ({"hf_config": {"model_type": "no_such_model"}}, "hf_config"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_hf_causal_lm(**options)


def test_hf_cache_decoding_equals_greedy_recomputation(gpt2: HfCausalLM) -> None:
    prompt = torch.randint(0, 256, (1, 8))
    decoder = HfCacheDecoder(gpt2, prompt, 6)
    with torch.no_grad():
        cached = decoder.decode()
        assert decoder.decode() == cached  # each call starts again from the prompt
        tokens, recomputed = prompt, []
        for _ in range(6):
            nxt = gpt2(tokens)[:, -1].argmax(-1, keepdim=True)
            recomputed.append(int(nxt))
            tokens = torch.cat([tokens, nxt], dim=1)
    assert cached == recomputed
    # 2 layers x keys and values x 64 floats x (8 prompt + 6 new tokens fed back)
    assert decoder.cache_bytes() == 2 * 2 * 64 * 14 * 4


def _quantize(method_name: str, bits: str, model: torch.nn.Module, calib: Any) -> Any:
    """The runner's lifecycle for one method, without the trial around it."""
    if method_name not in registry.methods:
        pytest.skip(f"method {method_name} is not registered (weight-only methods missing)")
    cls = registry.methods.get(method_name)
    method = cls(cls.Config.model_validate({"group_size": 32}), BitWidth.parse(bits))
    candidate = method.prepare(copy.deepcopy(model))
    if cls.capabilities.needs_calibration:
        candidate = method.calibrate(candidate, calib)
    return method, method.convert(candidate).eval()


@pytest.mark.parametrize(("method_name", "bits"), [("rtn", "w8"), ("gptq", "w4")])
def test_gpt2_through_weight_only_methods_and_onnx(
    gpt2: HfCausalLM, method_name: str, bits: str, tmp_path: Path
) -> None:
    data = load_text(32, 16, 16, torch.zeros(1, 32, dtype=torch.long), seed=0)
    method, quantized = _quantize(method_name, bits, gpt2, forward_loop(data, 8))
    remaining = [n for n, m in quantized.named_modules() if type(m) is torch.nn.Linear]
    assert not remaining, f"{method_name} left {remaining} in fp32"

    path = method.export(quantized, (data.eval_x[:1],), tmp_path / "model.onnx")
    check_onnx(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference, torch_out = gpt2(data.eval_x), quantized(data.eval_x)
    ort_out = session.run(None, {"input": data.eval_x.numpy()})[0]
    np.testing.assert_allclose(
        ort_out, torch_out.numpy(), atol=1e-2 + 0.05 * float(torch_out.abs().max())
    )

    task = LanguageModelling()
    ppl = task.metrics(torch_out, data.eval_y)["perplexity"]
    ppl_fp32 = task.metrics(reference, data.eval_y)["perplexity"]
    assert np.isfinite(ppl) and abs(ppl - ppl_fp32) < 0.1 * ppl_fp32


def test_an_hf_trial_decodes_with_its_cache_in_torch_and_recomputes_in_onnxruntime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QATBENCH_CACHE", str(tmp_path / "cache"))
    experiment = {
        "name": "hf",
        "models": [{"name": "hf_causal_lm", "options": {"hf_config": GPT2, "seq_len": 32}}],
        "methods": ["fp32"],
        "runtimes": ["torch", "onnxruntime"],
        "data": {
            "dataset": "text",
            "pretrain_epochs": 0,
            "eval_samples": 8,
            "calibration_samples": 8,
        },
        "measure": {
            "batch_sizes": [1],
            "max_time_s": 0.05,
            "min_rounds": 3,
            "warmup_s": 0.0,
            "per_layer": False,
            "generation": {"prompt_tokens": 8, "new_tokens": 4},
        },
    }
    threads = torch.get_num_threads()
    try:
        results = {
            t.runtime: run_trial(t, tmp_path / t.id)
            for t in validate_experiment(experiment, "hf").expand()
        }
    finally:
        torch.set_num_threads(threads)
    for r in results.values():
        assert r.status == "finished", (r.error, r.details.get("traceback"))
        assert r.metrics["perplexity"] > 1
    assert results["onnxruntime"].metrics["onnx_export_ok"] == 1.0
    assert "skipped" in results["torch"].details["onnx_export"]  # not asked for: no export
    torch_m, ort_m = results["torch"].metrics, results["onnxruntime"].metrics
    assert results["torch"].details["generation"]["decode_mode"] == "hf_kv_cache"
    assert torch_m["decode_tokens_per_s"] > 0 and torch_m["kv_cache_bytes"] > 0
    assert results["onnxruntime"].details["generation"]["decode_mode"] == "recompute"
    assert ort_m["recompute_decode_tokens_per_s"] > 0 and "decode_tokens_per_s" not in ort_m
    assert ort_m["onnx_parity_max_abs"] < 1e-3
