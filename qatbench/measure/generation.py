"""Generation metrics of language models: prefill latency, decode tokens/s, KV-cache memory.

A prompt of ``prompt_tokens`` is prefilled, then ``new_tokens`` are decoded greedily at
batch 1. How a model decodes is chosen from what it offers (duck-typed, nothing imported):

- ``step(idx, pos, cache)`` + ``new_cache(batch, length)`` (qatbench's GPT): a static KV
  cache. In torch the model's ``step`` runs eagerly; on onnxruntime two graphs are exported
  through the method's own ``export`` (a prefill graph over the prompt and a one-token
  decode graph, both taking the cache as an input and returning the new keys and values),
  so the quantized layers run the same kernels as in the trial's main graph. The two files
  are deleted once their sessions are open; they are not artifacts of the trial.
- ``cached_forward(ids, past)`` (Hugging Face models): the model's own KV cache, torch only.
- anything else, and onnxruntime where no decode graph can be had: *full-sequence
  recompute*, one forward over a window of the evaluation length per new token, with no
  cache at all. Its figures are named ``recompute_decode_*`` so they are never read as
  KV-cache decoding.

Metrics (prefill and decode timed in alternating rounds against the fp32 model's torch
decoder, as the batch latencies are): ``prefill_latency_p50_ms``, ``prefill_tokens_per_s``,
``prefill_speedup_vs_fp32``, ``decode_tokens_per_s``, ``decode_latency_p50_ms_per_token``,
``decode_speedup_vs_fp32`` (+ ``_ci_low``/``_ci_high``), ``kv_cache_bytes`` (the cache
after the prompt and the new tokens), ``weights_plus_kv_cache_bytes`` and
``greedy_prefix_match_fraction`` (share of the new tokens equal to fp32's greedy tokens
before the first difference; not for recompute, whose window is not the prompt).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from qatbench.measure.timing import PairedTiming, TimingSettings, time_pairs

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
ExportFn = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], Path], Path]
LoadFn = Callable[[Path], StepFn]  # a runtime loading a graph: (idx, pos, cache) -> outputs

KV_CACHE, HF_CACHE, RECOMPUTE = "kv_cache", "hf_kv_cache", "recompute"


class Decoder(Protocol):
    mode: str

    def prefill(self) -> None: ...

    def decode(self) -> list[int]: ...

    def cache_bytes(self) -> int: ...


@dataclass
class Generation:
    """What :func:`measure_generation` found."""

    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class StaticCacheDecoder:
    """Greedy decoding through ``step`` functions against a preallocated cache."""

    mode = KV_CACHE

    def __init__(
        self,
        prefill_step: StepFn,
        decode_step: StepFn,
        cache: torch.Tensor,
        prompt: torch.Tensor,
        new_tokens: int,
    ) -> None:
        self.prefill_step, self.decode_step = prefill_step, decode_step
        self.cache, self.prompt, self.new_tokens = cache, prompt, new_tokens
        self.first: torch.Tensor | None = None

    def prefill(self) -> None:
        p = self.prompt.shape[1]
        logits, kv = self.prefill_step(self.prompt, torch.zeros(1, dtype=torch.long), self.cache)
        self.cache[:, :, :, :p] = kv
        self.first = logits[:, -1].argmax(-1, keepdim=True)

    def decode(self) -> list[int]:
        """``new_tokens`` steps after the prompt; repeatable, since every call overwrites
        the same cache positions after the prompt's."""
        if self.first is None:
            self.prefill()
        assert self.first is not None
        p = self.prompt.shape[1]
        token, out = self.first, []
        for i in range(self.new_tokens):
            out.append(int(token))
            logits, kv = self.decode_step(token, torch.tensor([p + i]), self.cache)
            self.cache[:, :, :, p + i : p + i + 1] = kv
            token = logits[:, -1].argmax(-1, keepdim=True)
        return out

    def cache_bytes(self) -> int:
        return self.cache.numel() * self.cache.element_size()


class HfCacheDecoder:
    """Greedy decoding with a Hugging Face model's own (growing) cache object."""

    mode = HF_CACHE

    def __init__(self, model: Any, prompt: torch.Tensor, new_tokens: int) -> None:
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.past: Any = None
        self.first: torch.Tensor | None = None
        self.last_bytes = 0

    def prefill(self) -> None:
        logits, self.past = self.model.cached_forward(self.prompt, None)
        self.first = logits[:, -1].argmax(-1, keepdim=True)

    def decode(self) -> list[int]:
        """Starts from a copy of the prompt's cache (its cost is part of the decode)."""
        if self.first is None:
            self.prefill()
        assert self.first is not None
        past = self.model.copy_cache(self.past)
        token, out = self.first, []
        for _ in range(self.new_tokens):
            out.append(int(token))
            logits, past = self.model.cached_forward(token, past)
            token = logits[:, -1].argmax(-1, keepdim=True)
        self.last_bytes = self.model.cache_bytes(past)
        return out

    def cache_bytes(self) -> int:
        return self.last_bytes


class RecomputeDecoder:
    """No cache: every new token is a full forward over a fixed window of tokens."""

    mode = RECOMPUTE

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        window: torch.Tensor,
        new_tokens: int,
    ) -> None:
        self.forward, self.window, self.new_tokens = forward, window, new_tokens

    def prefill(self) -> None:
        self.forward(self.window)

    def decode(self) -> list[int]:
        window, out = self.window, []
        for _ in range(self.new_tokens):
            token = self.forward(window)[:, -1].argmax(-1, keepdim=True)
            out.append(int(token))
            window = torch.cat([window[:, 1:], token], dim=1)
        return out

    def cache_bytes(self) -> int:
        return 0


class _StepModule(torch.nn.Module):
    """``model.step`` as a module's forward, for ONNX export."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, idx: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.step(idx, pos, cache)  # type: ignore[operator]  # checked by caller


def has_static_cache(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "step", None)) and callable(getattr(model, "new_cache", None))


def torch_decoder(
    model: torch.nn.Module, prompt: torch.Tensor, window: torch.Tensor, n: int
) -> Decoder:
    """The best decoder the torch model offers."""
    if has_static_cache(model):
        cache = model.new_cache(1, prompt.shape[1] + n)  # type: ignore[operator]
        step: StepFn = model.step  # type: ignore[assignment]  # has_static_cache said so
        return StaticCacheDecoder(step, step, cache, prompt, n)
    if callable(getattr(model, "cached_forward", None)):
        return HfCacheDecoder(model, prompt, n)
    return RecomputeDecoder(model, window, n)


def graph_decoder(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    window: torch.Tensor,
    n: int,
    export: ExportFn,
    load: LoadFn,
    main: Callable[[torch.Tensor], torch.Tensor],
    out_dir: Path,
    notes: list[str],
) -> Decoder:
    """Decoding on a runtime of ONNX graphs: exported static-cache graphs (``load`` gives
    the runtime's call of a graph, inputs and outputs as tensors) where the model has
    ``step``, else full-sequence recompute through the trial's main graph (``main``)."""
    if has_static_cache(model):
        cache = model.new_cache(1, prompt.shape[1] + n)  # type: ignore[operator]
        module = _StepModule(model).eval()
        try:
            pos = torch.zeros(1, dtype=torch.long)
            pre = export(module, (prompt, pos, cache), out_dir / "prefill.onnx")
            dec = export(module, (prompt[:, :1], pos, cache), out_dir / "decode.onnx")
            return StaticCacheDecoder(load(pre), load(dec), cache, prompt, n)
        except Exception as exc:  # measured honestly without the cache instead
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            notes.append(f"no KV-cache decode graph ({reason}); decode measured by recompute")
        finally:  # measurement aids, not artifacts: the open sessions keep what they need
            shutil.rmtree(out_dir, ignore_errors=True)
    return RecomputeDecoder(main, window, n)


class _Tokens:
    """A decoder's ``decode`` that keeps the tokens of its last call."""

    def __init__(self, decode: Callable[[], list[int]]) -> None:
        self.decode, self.last = decode, list[int]()

    def __call__(self) -> None:
        self.last = self.decode()


def _samples_ms(timing: PairedTiming) -> dict[str, list[float]]:
    return {
        "candidate_ms": [t * 1e3 for t in timing.candidate.per_call_s],
        "fp32_ms": [t * 1e3 for t in timing.baseline.per_call_s],
    }


def measure_generation(
    fp32: torch.nn.Module,
    candidate: Decoder,
    tokens: torch.Tensor,
    prompt_tokens: int,
    new_tokens: int,
    settings: TimingSettings,
    weight_bytes: float | None,
) -> Generation:
    """Time ``candidate`` against the fp32 model's torch decoder on the same prompt.

    ``tokens`` is one evaluation sequence ``[1, t]``: its first ``prompt_tokens`` are the
    prompt, all of it the recompute window.
    """
    gen = Generation()
    prompt = tokens[:, :prompt_tokens]
    with torch.inference_mode():
        base = torch_decoder(fp32, prompt, tokens, new_tokens)
        # every greedy decode produces the same tokens: the timed ones are compared
        reference, produced = _Tokens(base.decode), _Tokens(candidate.decode)
        m = gen.metrics
        prefill, decode = time_pairs(
            [(base.prefill, candidate.prefill), (reference, produced)], settings
        )
    recompute = candidate.mode == RECOMPUTE
    prefix = "recompute_decode" if recompute else "decode"
    prefill_len = tokens.shape[1] if recompute else prompt.shape[1]
    m["prefill_latency_p50_ms"] = prefill.candidate.summary.median * 1e3
    m["prefill_tokens_per_s"] = prefill_len / prefill.candidate.summary.median
    if candidate.mode == base.mode:
        m["prefill_speedup_vs_fp32"] = prefill.speedup.value
    per_token = decode.candidate.summary.median / new_tokens
    m[f"{prefix}_tokens_per_s"] = 1.0 / per_token
    m[f"{prefix}_latency_p50_ms_per_token"] = per_token * 1e3
    if candidate.mode == base.mode:
        m["decode_speedup_vs_fp32"] = decode.speedup.value
        m["decode_speedup_ci_low"] = decode.speedup.ci_low
        m["decode_speedup_ci_high"] = decode.speedup.ci_high
    m["fp32_decode_tokens_per_s"] = new_tokens / decode.baseline.summary.median
    m["kv_cache_bytes"] = float(candidate.cache_bytes())
    if weight_bytes is not None:
        m["weights_plus_kv_cache_bytes"] = weight_bytes + m["kv_cache_bytes"]
    if (candidate.mode == RECOMPUTE) == (base.mode == RECOMPUTE):  # same context seen
        pairs = enumerate(zip(produced.last, reference.last, strict=True))
        first_difference = next((i for i, (a, b) in pairs if a != b), new_tokens)
        m["greedy_prefix_match_fraction"] = first_difference / new_tokens
    gen.details = {
        "decode_mode": candidate.mode,
        "fp32_decode_mode": base.mode,
        "prompt_tokens": int(prompt.shape[1]),
        "new_tokens": new_tokens,
        "recompute_window_tokens": int(tokens.shape[1]) if recompute else None,
        "decode_cv": decode.candidate.summary.cv,
        # per-call ms of every paired round, for compare's shift tests (as latency_samples)
        "samples": {
            name: _samples_ms(timing) for name, timing in (("prefill", prefill), ("decode", decode))
        },
    }
    if decode.candidate.summary.unstable:
        gen.warnings.append(f"unstable decode timing: cv {decode.candidate.summary.cv:.2f}")
    return gen
