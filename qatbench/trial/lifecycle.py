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
import copy
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
from qatbench.data.training import forward_loop, pretrained, train_loop
from qatbench.errors import PluginError, QatbenchError, TrialError
from qatbench.measure import size
from qatbench.methods.base import QuantMethod
from qatbench.quant.bitwidth import BitWidth
from qatbench.quant.weight_only_linear import kernel_summary
from qatbench.results import TrialFailure, TrialResult
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.runtimes import torch_compile as tc
from qatbench.runtimes.onnx_export import check_onnx, write_metadata
from qatbench.spec.checks import resolve_model_factory
from qatbench.spec.schema import TrialSpec
from qatbench.trial.measure_phase import Subjects, batch_of, generation, measure, predict
from qatbench.trial.measure_phase import TrialState as _State

PhaseReporter = Callable[[str], None]
INPUT_EXAMPLE = "input_example.npy"


def run_trial(trial: TrialSpec, out_dir: Path, report: PhaseReporter | None = None) -> TrialResult:
    """Run ``trial``, writing artifacts under ``out_dir``; always returns a result."""
    state = _State()
    report = report or (lambda _phase: None)
    params = {
        "model": {"name": trial.model.name, "factory": trial.model.factory, **trial.model.options},
        "method": {"name": trial.method.name, **trial.method.options},
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
    return TrialResult(
        id=trial.id,
        model=trial.model.name,
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


def pretrained_for(
    trial: TrialSpec, model: torch.nn.Module, data: TaskData
) -> tuple[torch.nn.Module, bool]:
    """``model`` pretrained on ``data`` as ``trial`` asks, or loaded from the cache, and
    whether the cache had it. This key is the one cache key of trials and of in-process
    quantization (the pytest fixtures), so both share pretrained weights."""
    key = {
        "model": trial.model.model_dump(exclude={"expect"}),
        "data": data.name,
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


def _checked(model: object, method: QuantMethod, step: str) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise PluginError(
            f"method {method.name!r}: {step}() returned {type(model).__name__}, not the model"
        )
    return model


def _lifecycle(trial: TrialSpec, out_dir: Path, state: _State, report: PhaseReporter) -> None:
    threads = trial.measure.threads
    torch.set_num_threads(threads)
    torch.manual_seed(trial.seed)
    rss_before = psutil.Process().memory_info().rss

    def step(name: str) -> contextlib.AbstractContextManager[None]:
        return _phase(state, report, name)

    with step("build"):
        model, example = _build(trial)
    with step("data"):
        data = load_data(trial.data, example[0], trial.seed)
        if data.task == "language_modelling":  # export and time at the data's length
            example = (data.eval_x[:1].clone(),)
    if data.labelled and trial.data.pretrain_epochs:
        with step("pretrain"):
            model, hit = pretrained_for(trial, model, data)
            state.details["pretrained_from_cache"] = hit
    model.eval()
    state.metrics["model_rss_delta_bytes"] = float(psutil.Process().memory_info().rss - rss_before)

    with step("reference"):
        fp32 = model
        reference_out = predict(fp32, data.eval_x, trial.data.batch_size)

    with step("prepare"):
        method_cls = registry.methods.get(trial.method.name)
        method: QuantMethod = method_cls(
            method_cls.Config.model_validate(trial.method.options), BitWidth.parse(trial.bits)
        )
        candidate = _checked(method.prepare(copy.deepcopy(fp32)), method, "prepare")
    caps = method.capabilities
    if caps.needs_calibration:
        with step("calibrate"):
            loop = forward_loop(data, trial.data.batch_size)
            candidate = _checked(method.calibrate(candidate, loop), method, "calibrate")
    if caps.needs_training:
        with step("train"):
            loop_t = train_loop(data, trial.data.batch_size, trial.seed)
            candidate = _checked(method.train(candidate, loop_t), method, "train")
    with step("convert"):
        candidate = _checked(method.convert(candidate), method, "convert").eval()
        state.details.update(kernel_summary(candidate))
        state.details["simulated"] = method.simulated
        state.metrics["quantized_weight_fraction"] = size.quantized_weight_fraction(fp32, candidate)

    onnx_path = out_dir / "model.onnx"
    subjects = Subjects(fp32, candidate, fp32_onnx_metadata=_fp32_metadata())
    with step("export"):
        if "onnxruntime" in caps.runtimes:
            sample = data.eval_x[:1] if data.eval_x.shape[1:] == example[0].shape[1:] else None
            subjects.session = _export(trial, method, candidate, example, onnx_path, state, sample)
            if subjects.session is not None and "torch" not in caps.runtimes:
                # quantized while exporting: the torch model is fp32, the graph is not
                state.metrics["quantized_weight_fraction"] = size.onnx_quantized_weight_fraction(
                    fp32, onnx_path
                )
        else:
            state.warnings.append(f"{method.name} runs in torch only: no ONNX export")

    if trial.runtime == "torch_compile":
        with step("compile"):
            _compile(trial, state, subjects, data, example)

    with step("measure"):
        # Methods that rewrite what a layer receives (smoothing folded into the previous
        # layer) have no like-for-like per-layer comparison.
        per_layer = trial.measure.per_layer and not getattr(method, "changes_layer_inputs", False)
        measure(
            trial,
            out_dir,
            state,
            subjects,
            data,
            reference_out,
            example,
            per_layer=per_layer,
            torch_runs=trial.runtime != "onnxruntime" or "torch" in caps.runtimes,
        )
        if data.task == "language_modelling" and trial.measure.generation.enabled:
            generation(trial, out_dir, state, subjects, data, method)
    state.metrics["peak_rss_bytes"] = float(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )


def _export(
    trial: TrialSpec,
    method: QuantMethod,
    candidate: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    onnx_path: Path,
    state: _State,
    sample: torch.Tensor | None = None,
) -> Any:
    """Export, check and open the ONNX graph; a failure fails only onnxruntime trials.

    ``sample`` (one evaluation input, else the example) is saved beside the graph as the
    input example of MLflow's ONNX flavour."""
    threads = trial.measure.threads
    try:
        method.export(candidate, example, onnx_path)
        write_metadata(onnx_path, onnx_metadata(trial, method))
        check_onnx(onnx_path)
        session = ortrt.make_session(onnx_path, threads)
    except Exception as exc:
        if trial.runtime == "onnxruntime":
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
    state.metrics["onnx_size_bytes"] = float(onnx_path.stat().st_size)
    integer, floating = ortrt.kernel_counts(onnx_path, threads)
    state.metrics["int_op_fraction"] = integer / max(integer + floating, 1)
    return session


def _build(trial: TrialSpec) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    factory = resolve_model_factory(trial.model)
    built = factory(**trial.model.options)
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module):
        model, example = built
        example = tuple(example) if isinstance(example, list | tuple) else (example,)
        return model, example
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
    """Compile the candidate, then fp32, for every shape measure() will feed them."""
    if len(example) != 1:
        raise TrialError("compile", "torch_compile runs models with one input tensor only")
    shapes = [*data.eval_x.split(trial.data.batch_size)]
    shapes += [batch_of(data.eval_x, n) for n in trial.measure.batch_sizes]
    tc.reset()  # a trial compiles from scratch, also when several run in one process
    compiled = tc.compile_model(subjects.candidate, shapes)
    subjects.compiled = compiled
    state.metrics["compile_time_s"] = compiled.seconds
    state.metrics["compile_graph_breaks"] = float(compiled.graph_breaks)
    state.details["compile"] = {
        "mode": tc.MODE,
        "dynamic": False,
        "graphs": compiled.graphs,
        "cache_hits": compiled.cache_hits,
    }
    if compiled.graph_breaks:
        state.warnings.append(
            f"torch.compile: {compiled.graph_breaks} graph breaks; parts run eager Python"
        )
    fp32 = tc.compile_model(subjects.fp32, shapes)
    subjects.fp32_compiled = fp32
    state.metrics["fp32_compile_time_s"] = fp32.seconds


def _fp32_metadata() -> dict[str, str]:
    return _metadata_props("fp32", "fp32", "none", "n/a", {})


def onnx_metadata(trial: TrialSpec, method: QuantMethod) -> dict[str, str]:
    """What qatbench writes into an exported graph's ``metadata_props`` (the opset is
    added by :func:`~qatbench.runtimes.onnx_export.write_metadata`)."""
    config = method.config
    calibration = "none"
    if method.capabilities.needs_calibration:
        observer = getattr(config, "observer", None)
        name = getattr(observer, "name", None) or getattr(config, "calibrate_method", "default")
        samples = trial.data.calibration_samples
        batches = -(-samples // trial.data.batch_size)
        calibration = json.dumps({"observer": name, "batches": batches, "samples": samples})
    group: object = "n/a"
    if hasattr(config, "group_size"):
        group = config.group_size or "per_channel"
    elif hasattr(config, "block_size"):
        group = config.block_size
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
