"""``torch.compile`` (inductor, CPU) as a runtime: compile once, before any warm-up.

A model is compiled with ``mode="default"`` (not ``max-autotune``: minutes on two cores)
and ``dynamic=False``, then called once on every input shape the trial will use (each
evaluation batch shape, each timed batch size), so every specialisation is built in the
``compile`` phase and none during timing. ``Compiled.seconds`` is that wall time: tracing,
inductor's code generation and the C++ compiler, less whatever inductor's on-disk caches
already held (``cache_hits`` says how many graphs came from them).

A model dynamo cannot capture whole falls back to eager Python between graphs; that is not
a failure but it is counted (``graph_breaks``) because such a model is not what
"compiled" promises. A compilation that raises fails the trial in phase ``compile``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.utils import counters

from qatbench.data.inputs import Batch, call, tensors_of
from qatbench.errors import TrialError
from qatbench.runtimes.base import TORCH_MODULE, Loaded, Runtime, RuntimeCapabilities

MODE = "default"
# Specialisations per code object before dynamo gives up and runs eager, silently. A trial
# compiles the candidate and fp32 (often the same model class) for a few shapes each.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Compiled:
    """A compiled model and what compiling it cost."""

    fn: Callable[..., torch.Tensor]
    seconds: float
    graph_breaks: int
    cache_hits: int
    graphs: int


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def _cache_hits() -> int:
    return int(counters["inductor"]["fxgraph_cache_hit"])


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (grows on every recompilation)."""
    return int(counters["stats"]["unique_graphs"])


def reset() -> None:
    """Forget every compiled graph of this process (inductor's disk cache stays), and allow
    ``RECOMPILE_LIMIT`` specialisations per function."""
    torch._dynamo.reset()
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


def compile_model(model: torch.nn.Module, inputs: Iterable[Batch]) -> Compiled:
    """Compile ``model`` and build it for the shape of each of ``inputs`` (see module).

    Runs under ``torch.inference_mode()``, the grad mode of every later call: a different
    one would fail dynamo's guards and compile again while being timed.
    """
    breaks, hits, frames = _graph_breaks(), _cache_hits(), graphs_compiled()
    start = time.perf_counter()
    compiled = torch.compile(model, mode=MODE, dynamic=False)
    seen: set[tuple[tuple[int, ...], ...]] = set()
    try:
        with torch.inference_mode():
            for x in inputs:
                shape = tuple(tuple(t.shape) for t in tensors_of(x))
                if shape not in seen:
                    seen.add(shape)
                    call(compiled, x)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        reason = f"torch.compile (inductor) failed: {type(exc).__name__}: {first}"
        raise TrialError("compile", reason[:400]) from exc
    return Compiled(
        fn=compiled,
        seconds=time.perf_counter() - start,
        graph_breaks=_graph_breaks() - breaks,
        cache_hits=_cache_hits() - hits,
        graphs=graphs_compiled() - frames,
    )


class TorchCompile(Runtime):
    """``torch_compile``: the converted module compiled by inductor for every input shape
    of the trial in ``load`` (the trial's ``compile`` phase); fresh instances are the same
    compiled function (compiling again per repeat would time the compiler)."""

    name = "torch_compile"
    capabilities = RuntimeCapabilities(artifact=TORCH_MODULE, compiles=True, decodes=False)
    description = "inductor, default mode, static shapes"

    def __init__(self, threads: int = 1) -> None:
        super().__init__(threads)
        self._graphs_after_load: int | None = None

    def load(self, artifact: Any, inputs: Sequence[Batch]) -> Loaded:
        if self._graphs_after_load is None:
            reset()  # a trial compiles from scratch, also when several run in one process
        compiled = compile_model(artifact, inputs)
        self._graphs_after_load = graphs_compiled()
        warnings = []
        if compiled.graph_breaks:
            warnings.append(
                f"torch.compile: {compiled.graph_breaks} graph breaks; parts run eager Python"
            )
        return Loaded(
            compiled.fn,
            metrics={
                "compile_time_s": compiled.seconds,
                "compile_graph_breaks": float(compiled.graph_breaks),
            },
            details={
                "compile": {
                    "mode": MODE,
                    "dynamic": False,
                    "graphs": compiled.graphs,
                    "cache_hits": compiled.cache_hits,
                }
            },
            warnings=warnings,
        )

    def fresh(self, artifact: Any, loaded: Loaded) -> Loaded:
        return loaded

    def timing_warnings(self) -> list[str]:
        if self._graphs_after_load is not None and graphs_compiled() > self._graphs_after_load:
            return ["torch.compile recompiled while being timed: latencies include it"]
        return []
