"""The nanoGPT-style decoder: shapes, presets, tied embeddings, causality, the static KV
cache against the full forward, and ONNX export of both paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qatbench import registry
from qatbench.measure.generation import StaticCacheDecoder, _StepModule
from qatbench.models.gpt import GPT, PRESETS, GPTConfig, build_gpt, build_gpt_tiny
from qatbench.runtimes.onnx_export import export_onnx


@pytest.fixture
def tiny() -> GPT:
    torch.manual_seed(0)
    model, _ = build_gpt_tiny(context=32)
    assert isinstance(model, GPT)
    return model.eval()


def test_presets_are_registered_models() -> None:
    for name in ("gpt", "gpt_tiny", "gpt_small", "gpt2_small_shape"):
        assert name in registry.models


def test_gpt2_small_shape_has_gpt2_small_parameter_count() -> None:
    config = PRESETS["gpt2_small_shape"]
    assert (config.layers, config.heads, config.width, config.context) == (12, 12, 768, 1024)
    model = GPT(config)  # 0.5 GB for a moment; the meta device takes longer to set up
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == 124_439_808  # GPT-2 small, tied LM head


def test_factory_returns_model_and_token_example() -> None:
    model, example = build_gpt_tiny()
    assert example[0].shape == (1, PRESETS["gpt_tiny"].context)
    assert example[0].dtype == torch.long
    assert model(example[0]).shape == (1, 64, 256)


def test_options_override_the_preset_and_unknown_options_name_the_allowed() -> None:
    model, example = build_gpt("gpt_tiny", layers=1, context=16)
    assert isinstance(model, GPT)
    assert len(model.blocks) == 1 and example[0].shape == (1, 16)
    with pytest.raises(TypeError, match="allowed"):
        build_gpt("gpt_tiny", depth=3)
    with pytest.raises(ValueError, match="known"):
        build_gpt("gpt_huge")
    with pytest.raises(ValueError, match="multiple of heads"):
        GPTConfig(width=30, heads=4)


def test_tied_and_untied_embeddings(tiny: GPT) -> None:
    assert tiny.lm_head.weight is tiny.wte.weight
    untied, _ = build_gpt_tiny(tie_embeddings=False)
    assert isinstance(untied, GPT)
    assert untied.lm_head.weight is not untied.wte.weight
    linears = [n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears[-1] == "lm_head" and len(linears) == 2 * 4 + 1


def test_causal_future_tokens_do_not_change_past_logits(tiny: GPT) -> None:
    x = torch.randint(0, 256, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        a, b = tiny(x), tiny(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_static_cache_prefill_and_decode_match_the_full_forward(tiny: GPT) -> None:
    x = torch.randint(0, 256, (3, 24))
    with torch.no_grad():
        full = tiny(x)
        cache = tiny.new_cache(3, 30)
        logits, kv = tiny.step(x[:, :10], torch.zeros(3, dtype=torch.long), cache)
        assert kv.shape == (3, 2 * 2, 2, 10, 32)
        cache[:, :, :, :10] = kv
        steps = [logits]
        for i in range(10, 24):
            logits, kv = tiny.step(x[:, i : i + 1], torch.full((3,), i), cache)
            cache[:, :, :, i : i + 1] = kv
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_cache_longer_than_context_is_refused(tiny: GPT) -> None:
    with pytest.raises(ValueError, match="context"):
        tiny.new_cache(1, 33)


def test_greedy_decoding_with_the_cache_equals_recomputing(tiny: GPT) -> None:
    prompt = torch.randint(0, 256, (1, 8))
    decoder = StaticCacheDecoder(tiny.step, tiny.step, tiny.new_cache(1, 20), prompt, 12)
    with torch.no_grad():
        cached = decoder.decode()
        again = decoder.decode()  # repeatable: overwrites the same positions
        tokens, recomputed = prompt, []
        for _ in range(12):
            nxt = tiny(tokens)[:, -1].argmax(-1, keepdim=True)
            recomputed.append(int(nxt))
            tokens = torch.cat([tokens, nxt], dim=1)
    assert cached == again
    assert cached == recomputed


def test_forward_and_step_export_to_onnx_with_parity(tiny: GPT, tmp_path: Path) -> None:
    x = torch.randint(0, 256, (1, 32))
    path = export_onnx(tiny, (x,), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        expected = tiny(batch).numpy()
    got = session.run(None, {"input": batch.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)

    cache = tiny.new_cache(1, 16)
    with torch.no_grad():
        cache[:, :, :, :5] = tiny.step(x[:, :5], torch.zeros(1, dtype=torch.long), cache)[1]
        want_logits, want_kv = tiny.step(x[:, 5:6], torch.tensor([5]), cache)
    step_path = export_onnx(
        _StepModule(tiny).eval(), (x[:, :1], torch.tensor([0]), cache), tmp_path / "step.onnx"
    )
    step = ort.InferenceSession(str(step_path), providers=["CPUExecutionProvider"])
    logits, kv = step.run(
        None, {"input0": x[:, 5:6].numpy(), "input1": np.array([5]), "input2": cache.numpy()}
    )
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(kv, want_kv.numpy(), atol=1e-5)
