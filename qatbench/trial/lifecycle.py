"""One trial's lifecycle, run inside an isolated worker process.

build -> data -> pretrain -> reference -> prepare -> calibrate -> train -> convert -> export
-> compile -> measure. The runner owns data and time: it builds the loops handed to the
method and times every phase. A failure anywhere becomes a failed :class:`TrialResult`
naming the phase, never an exception out of :func:`run_trial`.

``compile`` runs on the ``torch_compile`` runtime only: the candidate and the fp32 model
are compiled for every input shape the trial uses before any warm-up; the candidate's
wall time is ``compile_time_s`` (see :mod:`qatbench.runtimes.torch_compile`). Every
exported graph carries qatbench's ``metadata_props`` (method, bits, calibration, group
size, qatbench version, opset) and is checked for a dynamic batch axis; the example input
is saved beside it (``input_example.npy``) for MLflow's ONNX flavour.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import resource
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from qatbench import registry
from qatbench.data.datasets import TaskData, load_data
from qatbench.data.inputs import Batch, as_batch, batch_of, from_example, tensors_of
from qatbench.data.tasks import task_for
from qatbench.data.training import forward_loop, pretrained, train_loop
from qatbench.errors import PluginError, QatbenchError, TrialError
from qatbench.measure import size
from qatbench.memory import release_free_memory
from qatbench.methods.base import QuantMethod
from qatbench.methods.fp32 import Fp32Method
from qatbench.methods.layer_selection import AUTO
from qatbench.methods.lifecycle import quantize_copy
from qatbench.models.adapters import adapt
from qatbench.models.copies import weight_bytes
from qatbench.quant.bitwidth import BitWidth
from qatbench.quant.weight_only_linear import kernel_summary
from qatbench.results import TrialFailure, TrialResult
from qatbench.runtimes import onnx_weights
from qatbench.runtimes.base import (
    ONNX_GRAPH,
    REFERENCE_GRAPH_RUNTIME,
    RUNTIME_SETTINGS,
    TORCH_MODULE,
    Loaded,
    Runtime,
)
from qatbench.runtimes.onnx_export import check_onnx, graph_bytes, write_metadata
from qatbench.spec.checks import resolve_model_factory, resolve_task
from qatbench.spec.schema import TrialSpec
from qatbench.trial.measure_phase import (
    Subjects,
    generation,
    measure,
    predict,
    reference_graph_bytes,
    runtime_for,
)
from qatbench.trial.measure_phase import TrialState as _State
from qatbench.trial.mixed_precision import search_keep_fp32
from qatbench.trial.shared_fp32 import Conversion, SharedFp32, built_model, exports_graph

PhaseReporter = Callable[[str], None]
INPUT_EXAMPLE = "input_example.npy"


def run_trial(trial: TrialSpec, out_dir: Path, report: PhaseReporter | None = None) -> TrialResult:
    """Run ``trial``, writing artifacts under ``out_dir``; always returns a result."""
    state = _State()
    report = report or (lambda _phase: None)
    params = {
        "model": {
            "name": trial.model.name,
            **_label(trial.model.label),
            "factory": trial.model.factory,
            **trial.model.options,
        },
        "method": {"name": trial.method.name, **_label(trial.method.label), **trial.method.options},
        "bits": trial.bits,
        "runtime": trial.runtime,
        "seed": trial.seed,
        "data": trial.data.model_dump(),
        "measure": trial.measure.model_dump(),
    }
    try:
        _lifecycle(trial, Path(out_dir), state, report)
        status, failure = "finished", None
    except Exception as exc:  # a failing trial is a result, not a crash
        status, failure = "failed", TrialFailure(state.phase, _one_line(exc))
        state.details["traceback"] = traceback.format_exc(limit=20)
    if state.warnings:
        state.details["warnings"] = state.warnings
    if RUNTIME_SETTINGS in state.details:  # as the runtime reported them: MLflow params too
        params[RUNTIME_SETTINGS] = state.details[RUNTIME_SETTINGS]
    return TrialResult(
        id=trial.id,
        model=trial.model.key,
        method=trial.method.name,
        bits=trial.bits,
        runtime=trial.runtime,
        status=status,  # type: ignore[arg-type]  # one of two literals
        metrics=state.metrics,
        phases=state.phases,
        artifacts=state.artifacts,
        params=params,
        details=state.details,
        error=failure,
    )


def _label(label: str | None) -> dict[str, str]:
    return {"label": label} if label else {}


def pretrained_for(
    trial: TrialSpec, model: torch.nn.Module, data: TaskData
) -> tuple[torch.nn.Module, bool]:
    """``model`` pretrained on ``data`` as ``trial`` asks, or loaded from the cache, and
    whether the cache had it. This key is the one cache key of trials and of in-process
    quantization (the pytest fixtures), so both share pretrained weights."""
    key = {
        "model": trial.model.model_dump(exclude={"expect"}),
        "data": data.name,
        "split": 2,  # calibration held out of training (qatbench.data.datasets._digits)
        "epochs": trial.data.pretrain_epochs,
        "seed": trial.seed,
        "torch": torch.__version__,
    }
    return pretrained(
        model, key, data, trial.data.pretrain_epochs, trial.data.batch_size, trial.seed
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if isinstance(exc, TrialError):
        return exc.reason
    if isinstance(exc, QatbenchError):
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@contextlib.contextmanager
def _phase(state: _State, report: PhaseReporter, name: str) -> Iterator[None]:
    state.phase = name
    report(name)
    start = time.perf_counter()
    yield
    state.phases[f"{name}_s"] = time.perf_counter() - start


def method_for(trial: TrialSpec) -> QuantMethod:
    """The trial's method, configured with its options and bit-width."""
    cls = registry.methods.get(trial.method.name)
    return cls(cls.Config.model_validate(trial.method.options), BitWidth.parse(trial.bits))


def _mixed_precision(
    trial: TrialSpec, fp32: torch.nn.Module, data: TaskData, state: _State
) -> QuantMethod:
    """``keep_fp32: auto``: the search of :mod:`qatbench.trial.mixed_precision`, recorded in
    the trial; the method configured with the layers it kept."""
    cls = registry.methods.get(trial.method.name)
    bits = BitWidth.parse(trial.bits)
    batch = trial.data.batch_size

    def configured(keep: list[str]) -> QuantMethod:
        return cls(cls.Config.model_validate({**trial.method.options, "keep_fp32": keep}), bits)

    def quantize(keep: list[str]) -> torch.nn.Module:
        return quantize_copy(
            configured(keep),
            fp32,
            forward_loop=lambda: forward_loop(data, batch),
            train_loop=lambda: train_loop(data, batch, trial.seed),
        )

    task = task_for(data, resolve_task(trial.task) if trial.task else None)
    found = search_keep_fp32(
        quantize, fp32, data, task, dict(trial.budget), lambda m, x: predict(m, x, batch)
    )
    state.details["kept_fp32_layers"] = found.kept
    state.details["keep_fp32_search"] = {
        "ranking": found.ranking,
        "candidates": found.candidates,
        "validation": found.validation,
        "misses": found.misses,
    }
    state.metrics["kept_fp32_layers"] = float(len(found.kept))
    state.metrics["keep_fp32_candidates"] = float(found.candidates)
    state.metrics["keep_fp32_search_s"] = found.seconds
    state.metrics["budget_met"] = float(found.met)
    if not found.met:
        state.warnings.append(
            "keep_fp32: auto found no configuration within budget on the validation data; "
            f"kept the closest ({'; '.join(found.misses)})"
        )
    return configured(found.kept)


def _lifecycle(trial: TrialSpec, out_dir: Path, state: _State, report: PhaseReporter) -> None:
    threads = trial.measure.threads
    torch.set_num_threads(threads)
    torch.manual_seed(trial.seed)
    rss_before = psutil.Process().memory_info().rss

    def step(name: str) -> contextlib.AbstractContextManager[None]:
        return _phase(state, report, name)

    def peak(name: str) -> None:  # resident high-water mark after a phase, then collect
        state.details.setdefault("peak_rss_after_phase_bytes", {})[name] = _peak_rss()
        gc.collect()
        release_free_memory()

    with step("build"):  # or loaded: built once a sweep (shared_fp32.py)
        model, example, loaded = built_model(trial, lambda: build_model(trial))
    with step("data"):
        data = load_data(trial.data, as_batch(example), trial.seed)
        if data.task == "language_modelling":  # export and time at the data's length
            assert isinstance(data.eval_x, torch.Tensor)  # token ids, one tensor
            example = (data.eval_x[:1].clone(),)
    if data.labelled and trial.data.pretrain_epochs:
        with step("pretrain"):
            model, hit = pretrained_for(trial, model, data)
            state.details["pretrained_from_cache"] = hit
    model.eval()
    state.metrics["fp32_weight_bytes"] = float(weight_bytes(model))
    peak("build")
    state.metrics["model_rss_delta_bytes"] = float(psutil.Process().memory_info().rss - rss_before)

    with step("reference"):  # shared by the sweep's trials of this model (shared_fp32.py)
        fp32 = model
        shared = SharedFp32.of(trial, fp32)
        state.details["read_from_sweep"] = shared.read  # what it reads, as it reads it
        if loaded:
            shared.read.append("fp32_model")
        reference_out = shared.reference_outputs(
            lambda: predict(fp32, data.eval_x, trial.data.batch_size)
        )
        graph_bytes_fp32 = None
        graph_trial = runtime_for(trial).capabilities.artifact == ONNX_GRAPH
        if graph_trial and trial.method.name != Fp32Method.name:
            graph_bytes_fp32 = shared.graph_bytes(
                lambda: reference_graph_bytes(fp32, example, out_dir, _fp32_metadata())
            )
            peak("reference")  # the exporter's copies given back before quantizing

    state.phase = "prepare"  # a method that cannot be made fails where it would run
    method = method_for(trial)
    searched = trial.method.options.get("keep_fp32") == AUTO
    if searched:
        with step("search"):
            method = _mixed_precision(trial, fp32, data, state)
    caps = method.capabilities

    def convert() -> Conversion:
        model = quantize_copy(
            method,
            fp32,
            forward_loop=lambda: forward_loop(data, trial.data.batch_size),
            train_loop=lambda: train_loop(data, trial.data.batch_size, trial.seed),
            step=step,
        )
        return Conversion(model, method.choices(), trial.id)

    reusable = caps.reusable_model and not searched  # once a sweep (shared_fp32.py)
    if reusable and caps.quantizes:  # fp32's conversion is a copy sharing its tensors
        conversion = shared.converted(trial, convert)
        if conversion.by != trial.id:
            state.details["converted_by"] = conversion.by
    else:
        conversion = convert()
    candidate = conversion.model
    state.details.update(kernel_summary(candidate))
    state.details["simulated"] = method.simulated
    state.details.update(conversion.choices)
    state.metrics["quantized_weight_fraction"] = size.quantized_weight_fraction(fp32, candidate)
    peak("convert")

    runtime = runtime_for(trial)
    onnx_path = out_dir / "model.onnx"
    subjects = Subjects(
        fp32,
        candidate,
        runtime,
        fp32_onnx_metadata=_fp32_metadata(),
        fp32_graph_bytes=graph_bytes_fp32,
    )
    graph_runtime = (
        runtime
        if runtime.capabilities.artifact == ONNX_GRAPH
        else registry.runtimes.get(REFERENCE_GRAPH_RUNTIME)(trial.measure.threads)
    )
    wanted = exports_graph(trial)  # a torch trial exports only if the graph is kept
    with step("export"):
        if ONNX_GRAPH in caps.artifacts and not wanted:
            # a torch trial exports only when the experiment keeps the graph (artifacts:)
            state.details["onnx_export"] = "skipped: the experiment's artifacts omit onnx"
        elif ONNX_GRAPH in caps.artifacts:
            sample = _sample(data.eval_x, example)
            subjects.graph = _export(
                trial,
                method,
                candidate,
                example,
                onnx_path,
                state,
                graph_runtime,
                sample,
                shared if reusable else None,
            )
            if subjects.graph is not None and TORCH_MODULE not in caps.artifacts:
                # quantized while exporting: the torch model is fp32, the graph is not
                state.metrics["quantized_weight_fraction"] = size.onnx_quantized_weight_fraction(
                    fp32, onnx_path
                )
        else:
            state.warnings.append(f"{method.name} runs in torch only: no ONNX export")
    peak("export")
    if runtime.capabilities.artifact == ONNX_GRAPH:
        subjects.artifact, subjects.loaded = onnx_path, subjects.graph
        if trial.method.name == Fp32Method.name and subjects.graph is not None:
            shared.record_graph_bytes(graph_bytes(onnx_path))  # the others' reference
        if subjects.graph is not None:  # what loading measured (the precision used)
            _record_load(state, subjects.graph)

    if runtime.capabilities.compiles:
        with step("compile"):
            _compile(trial, state, subjects, data, example)

    with step("measure"):
        # Methods that rewrite what a layer receives (smoothing folded into the previous
        # layer) have no like-for-like per-layer comparison.
        per_layer = trial.measure.per_layer and not method.changes_layer_inputs
        measure(
            trial,
            out_dir,
            state,
            subjects,
            data,
            reference_out,
            example,
            per_layer=per_layer,
            torch_runs=TORCH_MODULE in caps.artifacts,
        )
        if data.task == "language_modelling" and trial.measure.generation.enabled:
            generation(trial, out_dir, state, subjects, data, method)
    peak("measure")
    if "onnx" in state.artifacts:  # kept as one file: MLflow's logged model links to it
        try:
            onnx_weights.store_inline(Path(state.artifacts["onnx"]))
        except OSError as exc:  # the graph stays valid with its data file; nothing lost
            state.warnings.append(f"graph kept with its external data: {_one_line(exc)}")
    state.metrics["peak_rss_bytes"] = _peak_rss()
    state.metrics["peak_rss_vs_fp32_weights"] = (
        state.metrics["peak_rss_bytes"] / state.metrics["fp32_weight_bytes"]
    )


def _peak_rss() -> float:
    """This worker's resident high-water mark so far, in bytes."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _export(
    trial: TrialSpec,
    method: QuantMethod,
    candidate: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    onnx_path: Path,
    state: _State,
    graph_runtime: Runtime,
    sample: torch.Tensor | None = None,
    shared: SharedFp32 | None = None,
) -> Loaded | None:
    """Export, check and load the ONNX graph on ``graph_runtime`` (the trial's own when it
    runs graphs); a failure fails only trials whose runtime runs the graph. With
    ``shared``, the graph another trial of the sweep exported from the same conversion is
    linked instead (``details.exported_by`` names that trial).

    ``sample`` (one evaluation input, else the example) is saved beside the graph as the
    input example of MLflow's ONNX flavour."""

    def write_graph() -> None:
        method.export(candidate, example, onnx_path)
        write_metadata(onnx_path, onnx_metadata(trial, method))
        check_onnx(onnx_path)

    try:
        if shared is None:
            write_graph()
        else:
            by = shared.exported(trial, onnx_path, write_graph)
            if by != trial.id:
                state.details["exported_by"] = by
        # counted before the trial's session opens: the count opens a session of its own
        fraction = graph_runtime.integer_fraction(onnx_path)
        loaded = graph_runtime.load(onnx_path, [])
    except Exception as exc:
        if state_runs_graph(trial):
            raise
        state.metrics["onnx_export_ok"] = 0.0
        state.warnings.append(f"ONNX export failed: {_one_line(exc)}")
        return None
    state.artifacts["onnx"] = str(onnx_path)
    if len(example) == 1:
        shown = sample if sample is not None else example[0]
        np.save(onnx_path.with_name(INPUT_EXAMPLE), shown.numpy())
        state.artifacts["onnx_input_example"] = str(onnx_path.with_name(INPUT_EXAMPLE))
    state.metrics["onnx_export_ok"] = 1.0
    state.metrics["onnx_size_bytes"] = float(graph_bytes(onnx_path))
    if fraction is not None:
        state.metrics["int_op_fraction"] = fraction
    return loaded


def _sample(eval_x: Batch, example: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """One evaluation input to show as the graph's input example, where it is one tensor
    shaped like the example."""
    if isinstance(eval_x, torch.Tensor) and eval_x.shape[1:] == example[0].shape[1:]:
        return eval_x[:1]
    return None


def state_runs_graph(trial: TrialSpec) -> bool:
    """Whether the trial's runtime runs the exported graph (so a failed export fails it)."""
    return bool(registry.runtimes.get(trial.runtime).capabilities.artifact == ONNX_GRAPH)


def build_model(trial: TrialSpec) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    factory = resolve_model_factory(trial.model)
    built = factory(**trial.model.options)
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module):
        model, raw = built
        where = f"models: {trial.model.key}"
        batch, names = from_example(raw, where)
        example = tensors_of(batch)
        return adapt(model, example, names, trial.model.output, where), example
    raise PluginError(
        f"model {trial.model.name!r}: factory must return (model, example_inputs), "
        f"got {type(built).__name__}"
    )


def _compile(
    trial: TrialSpec,
    state: _State,
    subjects: Subjects,
    data: TaskData,
    example: tuple[torch.Tensor, ...],
) -> None:
    """Load the candidate, then fp32, on a compiling runtime for every shape measure()
    will feed them; fp32's compile time is ``fp32_compile_time_s``."""
    runtime = subjects.runtime
    assert runtime is not None  # the lifecycle made it
    shapes = [*data.eval_x.split(trial.data.batch_size)]
    shapes += [batch_of(data.eval_x, n) for n in trial.measure.batch_sizes]
    loaded = runtime.load(subjects.candidate, shapes)
    subjects.artifact, subjects.loaded = subjects.candidate, loaded
    _record_load(state, loaded)
    fp32 = runtime.load(subjects.fp32, shapes)
    subjects.fp32_loaded = fp32
    state.metrics.update({f"fp32_{k}": v for k, v in fp32.metrics.items() if "time" in k})


def _record_load(state: _State, loaded: Loaded) -> None:
    state.metrics.update(loaded.metrics)
    state.details.update(loaded.details)
    state.warnings.extend(loaded.warnings)


def _fp32_metadata() -> dict[str, str]:
    return _metadata_props("fp32", "fp32", "none", "n/a", {})


def onnx_metadata(trial: TrialSpec, method: QuantMethod) -> dict[str, str]:
    """What qatbench writes into an exported graph's ``metadata_props`` (the opset is
    added by :func:`~qatbench.runtimes.onnx_export.write_metadata`)."""
    described = method.describe()
    calibration = "none"
    if described["observer"] != "none":
        samples = trial.data.calibration_samples
        batches = -(-samples // trial.data.batch_size)
        calibration = json.dumps(
            {"observer": described["observer"], "batches": batches, "samples": samples}
        )
    group = described["group_size"]
    return _metadata_props(
        trial.method.name, trial.bits, calibration, str(group), trial.method.options
    )


def _metadata_props(
    method: str, bits: str, calibration: str, group_size: str, options: dict[str, Any]
) -> dict[str, str]:
    return {
        "qatbench.version": importlib.metadata.version("qatbench"),
        "qatbench.method": method,
        "qatbench.bits": bits,
        "qatbench.calibration": calibration,
        "qatbench.group_size": group_size,
        "qatbench.method_options": json.dumps(options, sort_keys=True, default=str),
    }
