"""The measure phase of a trial: size, output error, ONNX parity, paired latency.

The runtime decides what runs: ``torch`` the converted module, ``torch_compile`` the
module compiled by inductor (compiled in the trial's ``compile`` phase), ``onnxruntime``
the exported graph. Speed-ups are paired ratios of medians, fp32 rounds alternating with
the candidate's in this process: ``speedup_vs_fp32_b{N}`` is always against **eager fp32
torch**, the issue's baseline, whatever runs the candidate. On ``torch_compile`` the
candidate is also paired with the compiled fp32 model, timed the same way, as
``speedup_vs_fp32_compiled_b{N}``: how much of a speed-up is the method's and how much
the compiler's.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qatbench import registry
from qatbench.data.datasets import TaskData
from qatbench.data.inputs import Batch, batch_of, call, tensors_of
from qatbench.data.tasks import checked_quality, task_for
from qatbench.measure import error as err
from qatbench.measure import generation as gen
from qatbench.measure import size
from qatbench.measure.latency_metrics import batch_metrics
from qatbench.measure.timing import Pair, PairedTiming, TimingSettings, time_pairs
from qatbench.methods.base import QuantMethod
from qatbench.methods.fp32 import Fp32Method
from qatbench.models.copies import shared_copy
from qatbench.quant.weight_only_linear import fp32_kernels
from qatbench.runtimes import parity
from qatbench.runtimes.base import ONNX_GRAPH, REFERENCE_GRAPH_RUNTIME, Loaded, Runtime
from qatbench.runtimes.onnx_export import export_onnx, graph_bytes, write_metadata
from qatbench.spec.checks import resolve_task
from qatbench.spec.schema import TORCH_ARTIFACT, TrialSpec

TOP_LAYERS = 10


@dataclass
class TrialState:
    """Mutable bookkeeping of one trial while it runs."""

    phase: str = "setup"
    phases: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Subjects:
    """What the measure phase compares: fp32 against the candidate on the trial's runtime.

    ``artifact`` is what the runtime runs (the candidate module, or the exported graph's
    path) and ``loaded`` its call; ``graph`` is the exported graph loaded for the parity
    check (the trial's own call when its runtime runs graphs); ``fp32_loaded`` is fp32 on
    a compiling runtime, the second baseline of ``speedup_vs_fp32_compiled_b{N}``."""

    fp32: torch.nn.Module
    candidate: torch.nn.Module
    runtime: Runtime | None = None
    artifact: Any = None
    loaded: Loaded | None = None
    graph: Loaded | None = None
    fp32_loaded: Loaded | None = None
    fp32_onnx_metadata: dict[str, str] = field(default_factory=dict)
    fp32_graph_bytes: int | None = None  # see reference_graph_bytes


def reference_graph_bytes(
    fp32: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    out_dir: Path,
    metadata: dict[str, str],
) -> int:
    """Bytes of fp32's graph, exported and labelled like a trial's artifact (then deleted),
    so fp32 on a graph runtime is exactly 1.0 and every ratio compares the bytes of two
    files as written. A trial calls it before it quantizes: the exporter's constant
    folding copies the weights for a moment, best done while fp32 is the only model held."""
    path = export_onnx(fp32, example, out_dir / "fp32_reference" / "model.onnx")
    write_metadata(path, metadata)
    size = graph_bytes(path)
    shutil.rmtree(path.parent)
    return size


def runtime_for(trial: TrialSpec) -> Runtime:
    """The trial's runtime, with its thread count."""
    return registry.runtimes.get(trial.runtime)(trial.measure.threads)  # type: ignore[no-any-return]


def _running(trial: TrialSpec, subjects: Subjects) -> tuple[Runtime, Any, Loaded]:
    """The runtime, its artifact and the artifact's call, loaded on first use."""
    if subjects.runtime is None:
        subjects.runtime = runtime_for(trial)
    if subjects.artifact is None:
        subjects.artifact = subjects.candidate
    if subjects.loaded is None:
        subjects.loaded = subjects.runtime.load(subjects.artifact, [])
    return subjects.runtime, subjects.artifact, subjects.loaded


def predict(fn: Callable[..., torch.Tensor], x: Batch, batch: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([call(fn, xb) for xb in x.split(batch)])


def timing_settings(trial: TrialSpec) -> TimingSettings:
    target = trial.measure.target_ci_pct
    return TimingSettings(
        warmup_s=trial.measure.warmup_s,
        min_round_s=trial.measure.min_round_s,
        min_rounds=trial.measure.min_rounds,
        max_time_s=trial.measure.max_time_s,
        repeats=trial.measure.repeats,
        target_ci=None if target is None else target / 100,
    )


def measure(
    trial: TrialSpec,
    out_dir: Path,
    state: TrialState,
    subjects: Subjects,
    data: TaskData,
    reference_out: torch.Tensor,
    example: tuple[torch.Tensor, ...],
    *,
    per_layer: bool,
    torch_runs: bool,
) -> None:
    m = state.metrics
    fp32, candidate = subjects.fp32, subjects.candidate
    runtime, _artifact, loaded = _running(trial, subjects)
    run = loaded.fn
    if runtime.capabilities.artifact == ONNX_GRAPH:
        m["size_bytes"] = m["onnx_size_bytes"]
        # fp32's own graph is the reference (see reference_graph_bytes): not exported twice.
        if trial.method.name == Fp32Method.name:
            fp32_bytes = graph_bytes(Path(state.artifacts["onnx"]))
        elif subjects.fp32_graph_bytes is not None:
            fp32_bytes = subjects.fp32_graph_bytes
        else:
            fp32_bytes = reference_graph_bytes(fp32, example, out_dir, subjects.fp32_onnx_metadata)
        m["weight_bytes"] = float(size.onnx_weight_bytes(Path(state.artifacts["onnx"])))
    else:
        # Counted as torch.save writes them; the file is kept only where the experiment's
        # artifacts ask for it.
        m["size_bytes"] = float(size.torch_artifact_bytes(candidate))
        if TORCH_ARTIFACT in trial.artifacts:
            size.save_torch_artifact(candidate, out_dir / "model.pt")
            state.artifacts["torch"] = str(out_dir / "model.pt")
        fp32_bytes = size.torch_artifact_bytes(fp32)
        m["weight_bytes"] = float(size.torch_weight_bytes(candidate))
    m["compression_ratio"] = fp32_bytes / m["size_bytes"]

    outputs = predict(run, data.eval_x, trial.data.batch_size)
    m.update(err.output_error(reference_out, outputs))
    degenerate = err.degenerate_outputs(reference_out, outputs)
    m["output_degenerate"] = float(degenerate is not None)
    if degenerate is not None:
        state.details["output_degenerate"] = degenerate
        state.warnings.append(f"quality figures meaningless: {degenerate}")
    if subjects.graph is not None and torch_runs:  # graph-only methods: no torch model
        on = (
            runtime.name if runtime.capabilities.artifact == ONNX_GRAPH else REFERENCE_GRAPH_RUNTIME
        )
        # on a graph runtime the graph's outputs are the ones just evaluated
        graph_out = outputs if subjects.graph is loaded else None
        _parity(trial, state, candidate, subjects.graph, data, on, reference_out, graph_out)
    # the quality task: the experiment's, else the dataset's (accuracy, perplexity)
    task = task_for(data, resolve_task(trial.task) if trial.task else None)
    if task is not None and (data.eval_y is not None or not task.needs_targets):
        m.update(checked_quality(task, outputs, reference_out, data.eval_y))
        state.details["metric_directions"] = dict(task.directions)

    if per_layer:
        layers = err.layer_errors(fp32, candidate, data.calib_x[: trial.data.batch_size])
        if layers:
            state.details["per_layer"] = layers[:TOP_LAYERS]
            m["worst_layer_sqnr_db"] = float(layers[0]["sqnr_db"])
    _latency(trial, state, subjects, data)


def _parity(
    trial: TrialSpec,
    state: TrialState,
    candidate: torch.nn.Module,
    graph: Loaded,
    data: TaskData,
    graph_runtime: str,
    reference_out: torch.Tensor,
    graph_out: torch.Tensor | None = None,
) -> None:
    # one batch of the evaluation data: the graph's agreement with torch, not its quality
    batch = trial.data.batch_size
    x = data.eval_x[:batch]
    reference_out = reference_out[:batch]
    with fp32_kernels(candidate):  # ONNX graphs compute in fp32: so does the reference
        torch_out = predict(candidate, x, batch)
    ort_out = graph_out[:batch] if graph_out is not None else predict(graph.fn, x, batch)
    step = parity.output_step(candidate, x)
    # the tolerance is never tighter than the quantization's own error (runtimes/parity.py)
    compounding = parity.activation_quantizing_layers(candidate) >= 2
    quantization_error = (
        float((torch_out.float() - reference_out.float()).abs().max())
        if compounding and torch_out.shape == reference_out.shape
        else 0.0
    )
    result = parity.compare(
        torch_out,
        ort_out,
        step,
        parity.requantizing_layers(candidate),
        parity.weight_only_layers(candidate),
        quantization_error if math.isfinite(quantization_error) else 0.0,
    )
    state.metrics["onnx_parity_max_abs"] = result.max_abs
    state.metrics["onnx_parity_tolerance"] = result.tolerance
    state.metrics["onnx_parity_ok"] = 1.0 if result.ok else 0.0
    state.details["onnx_parity_basis"] = result.basis
    if result.steps:
        state.details["onnx_parity_steps"] = result.steps
    if not result.ok:
        state.warnings.append(
            f"ONNX parity: {graph_runtime} differs from torch by {result.max_abs:.3g}, more than "
            f"the tolerance {result.tolerance:.3g} ({result.basis.replace('_', ' ')})"
        )


def _latency(trial: TrialSpec, state: TrialState, subjects: Subjects, data: TaskData) -> None:
    """Every batch size's pairs timed in turn, block by block (see measure/timing.py).

    Each repeat times fresh instances: a copy of fp32, and the runtime's fresh instance of
    the candidate (a copy of the module, a new session of the graph; compiled functions
    stay as compiled). Where Python overhead dominates (the quick start's tiny
    transformer), the fp32 object built, trained or loaded earlier in the trial ran about
    6% slower than a copy of itself, and the session a trial had evaluated with 1-6% slower
    than a new one; copies of one model differed by up to 5% among themselves. One fixed
    pair of objects would bias the whole trial by such an offset, invisibly to its interval.
    """
    m = state.metrics
    runtime, _artifact, _loaded = _running(trial, subjects)
    # Inputs made outside inference mode, as the compile phase made its own: an inference
    # tensor fails dynamo's guards and compiles the model again while it is timed.
    inputs = [batch_of(data.eval_x, n) for n in trial.measure.batch_sizes]
    fresh = fresh_instances(trial, state, subjects)
    fp32_loaded = subjects.fp32_loaded

    def pairs(repeat: int) -> list[Pair]:
        fp32, candidate_for = fresh()
        made: list[Pair] = []
        for x in inputs:
            cand_fn = candidate_for(x)
            made.append((_bind(fp32, x), cand_fn))
            if fp32_loaded is not None:
                made.append((_bind(fp32_loaded.fn, x), cand_fn))
        return made

    with torch.inference_mode():
        timed = iter(time_pairs(pairs, timing_settings(trial)))
    samples: dict[str, Any] = {}
    for n in trial.measure.batch_sizes:
        rounds = _rounds(next(timed))
        if fp32_loaded is not None:
            compiled = _rounds(next(timed))
            rounds["fp32_compiled_ms"] = compiled["fp32_ms"]
            rounds["compiled_candidate_ms"] = compiled["candidate_ms"]
            rounds["compiled_repeat_of_round"] = compiled["repeat_of_round"]
        metrics, warnings = batch_metrics(n, rounds)
        m.update(metrics)
        state.warnings.extend(warnings)
        samples[f"b{n}"] = rounds
    state.details["latency_samples"] = samples
    state.warnings.extend(runtime.timing_warnings())


CandidateCall = Callable[[Batch], Callable[[], object]]


def fresh_instances(
    trial: TrialSpec, state: TrialState, subjects: Subjects
) -> Callable[[], tuple[torch.nn.Module, CandidateCall]]:
    """A maker of one repeat's instances: a copy of fp32's module objects sharing its
    weights (:func:`~qatbench.models.copies.shared_copy`: new objects, no second copy of
    the weights), and the candidate's call per input from a fresh instance of the
    runtime's (see :meth:`Runtime.fresh`). What the runtime
    notes while doing so (a candidate that could not be copied) goes into the details.
    Copies are made outside inference mode, like the models they copy."""
    runtime, artifact, loaded = _running(trial, subjects)

    def fresh() -> tuple[torch.nn.Module, CandidateCall]:
        with torch.inference_mode(False):
            fp32 = shared_copy(subjects.fp32)
        instance = runtime.fresh(artifact, loaded)
        state.details.update(loaded.details if instance is loaded else instance.details)
        return fp32, lambda x: instance.bind(*tensors_of(x))

    return fresh


def _rounds(paired: PairedTiming) -> dict[str, Any]:
    """The rounds of one pair as plain data (ms), as report.json keeps them."""
    return {
        "candidate_ms": [t * 1e3 for t in paired.candidate.per_call_s],
        "fp32_ms": [t * 1e3 for t in paired.baseline.per_call_s],
        "repeat_of_round": list(paired.repeat_of_round),
        "speedup_per_repeat": list(paired.repeat_speedups),
    }


def generation(
    trial: TrialSpec,
    out_dir: Path,
    state: TrialState,
    subjects: Subjects,
    data: TaskData,
    method: QuantMethod,
) -> None:
    """Prefill latency, decode tokens/s and KV-cache memory (see measure/generation.py)."""
    runtime, _artifact, loaded = _running(trial, subjects)
    if not runtime.capabilities.decodes:
        state.warnings.append(f"generation is not measured on {runtime.name}")
        return
    spec = trial.measure.generation
    candidate = subjects.candidate
    assert isinstance(data.eval_x, torch.Tensor)  # text: token ids, one tensor
    tokens = data.eval_x[:1]
    prompt = min(spec.prompt_tokens, tokens.shape[1])
    context = int(getattr(candidate, "context", tokens.shape[1]))
    new_tokens = min(spec.new_tokens, context - prompt)
    if new_tokens < spec.new_tokens:
        state.warnings.append(f"generation: {new_tokens} new tokens fit the context of {context}")
    if new_tokens < 1:
        state.warnings.append("generation: the prompt fills the context; nothing to decode")
        return
    notes: list[str] = []
    if runtime.capabilities.artifact == ONNX_GRAPH:
        decoder = gen.graph_decoder(
            candidate,
            tokens[:, :prompt],
            tokens,
            new_tokens,
            method.export,
            lambda path: runtime.load(path, []).fn,
            loaded.fn,
            out_dir / "generation",
            notes,
        )
    else:
        decoder = gen.torch_decoder(candidate, tokens[:, :prompt], tokens, new_tokens)
    weights = state.metrics.get("weight_bytes")
    result = gen.measure_generation(
        subjects.fp32, decoder, tokens, prompt, new_tokens, timing_settings(trial), weights
    )
    state.metrics.update(result.metrics)
    state.details["generation"] = result.details
    state.warnings.extend(notes + result.warnings)


def _bind(model: Callable[..., object], x: Batch) -> Callable[[], object]:
    return functools.partial(model, *tensors_of(x))
