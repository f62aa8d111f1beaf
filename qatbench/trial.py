"""One trial's lifecycle, run inside an isolated worker process.

build -> data -> pretrain -> reference -> prepare -> calibrate -> train -> convert -> export
-> measure. The runner owns data and time: it builds the loops handed to the method and
times every phase. A failure anywhere becomes a failed :class:`TrialResult` naming the
phase, never an exception out of :func:`run_trial`.
"""

from __future__ import annotations

import contextlib
import copy
import resource
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from qatbench import registry
from qatbench.bitwidth import BitWidth
from qatbench.data.datasets import TaskData, load_data
from qatbench.data.tasks import task_for
from qatbench.data.training import forward_loop, pretrained, train_loop
from qatbench.errors import PluginError, QatbenchError
from qatbench.export import check_onnx, export_onnx
from qatbench.measure import error as err
from qatbench.measure import generation as gen
from qatbench.measure import size
from qatbench.measure.timing import TimingSettings, time_paired
from qatbench.methods.base import QuantMethod
from qatbench.quant.weight_only_linear import kernel_summary
from qatbench.results import TrialFailure, TrialResult
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.spec import TrialSpec, resolve_model_factory

PhaseReporter = Callable[[str], None]
TOP_LAYERS = 10


@dataclass
class _State:
    """Mutable bookkeeping of one trial while it runs."""

    phase: str = "setup"
    phases: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
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
            key = {
                "model": trial.model.model_dump(exclude={"expect"}),
                "data": data.name,
                "epochs": trial.data.pretrain_epochs,
                "seed": trial.seed,
                "torch": torch.__version__,
            }
            model, hit = pretrained(
                model, key, data, trial.data.pretrain_epochs, trial.data.batch_size, trial.seed
            )
            state.details["pretrained_from_cache"] = hit
    model.eval()
    state.metrics["model_rss_delta_bytes"] = float(psutil.Process().memory_info().rss - rss_before)

    with step("reference"):
        fp32 = model
        reference_out = _predict(fp32, data.eval_x, trial.data.batch_size)

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

    onnx_path = out_dir / "model.onnx"
    session = None
    with step("export"):
        if "onnxruntime" in caps.runtimes:
            session = _export(trial, method, candidate, example, onnx_path, state)
        else:
            state.warnings.append(f"{method.name} runs in torch only: no ONNX export")

    with step("measure"):
        # Methods that rewrite what a layer receives (smoothing folded into the previous
        # layer) have no like-for-like per-layer comparison.
        per_layer = trial.measure.per_layer and not getattr(method, "changes_layer_inputs", False)
        _measure(
            trial,
            out_dir,
            state,
            fp32,
            candidate,
            session,
            data,
            reference_out,
            example,
            per_layer=per_layer,
            torch_runs=trial.runtime == "torch" or "torch" in caps.runtimes,
        )
        if data.task == "language_modelling" and trial.measure.generation.enabled:
            _generation(trial, out_dir, state, fp32, candidate, session, data, method)
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
) -> Any:
    """Export, check and open the ONNX graph; a failure fails only onnxruntime trials."""
    threads = trial.measure.threads
    try:
        method.export(candidate, example, onnx_path)
        check_onnx(onnx_path)
        session = ortrt.make_session(onnx_path, threads)
    except Exception as exc:
        if trial.runtime == "onnxruntime":
            raise
        state.metrics["onnx_export_ok"] = 0.0
        state.warnings.append(f"ONNX export failed: {_one_line(exc)}")
        return None
    state.artifacts["onnx"] = str(onnx_path)
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


def _predict(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int
) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(xb) for xb in x.split(batch)])


def _batch(x: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous()


def _measure(
    trial: TrialSpec,
    out_dir: Path,
    state: _State,
    fp32: torch.nn.Module,
    candidate: torch.nn.Module,
    session: Any,
    data: TaskData,
    reference_out: torch.Tensor,
    example: tuple[torch.Tensor, ...],
    *,
    per_layer: bool,
    torch_runs: bool,
) -> None:
    m = state.metrics
    if trial.runtime == "onnxruntime":
        run = ortrt.as_callable(session)
        m["size_bytes"] = m["onnx_size_bytes"]
        fp32_path = export_onnx(fp32, example, out_dir / "fp32_reference" / "model.onnx")
        fp32_bytes = fp32_path.stat().st_size
        fp32_path.unlink()
        fp32_path.parent.rmdir()
        m["weight_bytes"] = float(size.onnx_weight_bytes(Path(state.artifacts["onnx"])))
    else:
        run = candidate
        m["size_bytes"] = float(size.save_torch_artifact(candidate, out_dir / "model.pt"))
        state.artifacts["torch"] = str(out_dir / "model.pt")
        # Same file name as the artifact: torch.save stores the name inside the archive.
        reference = out_dir / "fp32_reference" / "model.pt"
        fp32_bytes = size.save_torch_artifact(fp32, reference)
        reference.unlink()
        reference.parent.rmdir()
        m["weight_bytes"] = float(size.torch_weight_bytes(candidate))
    m["compression_ratio"] = fp32_bytes / m["size_bytes"]

    outputs = _predict(run, data.eval_x, trial.data.batch_size)
    m.update(err.output_error(reference_out, outputs))
    if session is not None and torch_runs:  # ort-only methods: no torch model to agree with
        torch_out = _predict(candidate, data.eval_x, trial.data.batch_size)
        ort_out = _predict(ortrt.as_callable(session), data.eval_x, trial.data.batch_size)
        m["onnx_parity_max_abs"] = float((torch_out - ort_out).abs().max())
    if data.eval_y is not None:  # accuracy, or perplexity and next-token accuracy
        m.update(task_for(data).quality(outputs, reference_out, data.eval_y))

    if per_layer:
        layers = err.layer_errors(fp32, candidate, data.calib_x[: trial.data.batch_size])
        if layers:
            state.details["per_layer"] = layers[:TOP_LAYERS]
            m["worst_layer_sqnr_db"] = float(layers[0]["sqnr_db"])

    settings = TimingSettings(
        warmup_s=trial.measure.warmup_s,
        min_round_s=trial.measure.min_round_s,
        min_rounds=trial.measure.min_rounds,
        max_time_s=trial.measure.max_time_s,
    )
    samples: dict[str, Any] = {}
    for n in trial.measure.batch_sizes:
        x = _batch(data.eval_x, n)
        with torch.inference_mode():
            base_fn = _bind(fp32, x)
            cand_fn = (
                ortrt.runner_for(session, x)
                if trial.runtime == "onnxruntime"
                else _bind(candidate, x)
            )
            paired = time_paired(base_fn, cand_fn, settings)
        s = paired.candidate.summary
        m[f"latency_p50_ms_b{n}"] = s.median * 1e3
        m[f"latency_p90_ms_b{n}"] = s.p90 * 1e3
        m[f"latency_p99_ms_b{n}"] = s.p99 * 1e3
        m[f"latency_ci_low_ms_b{n}"] = s.median_ci_low * 1e3
        m[f"latency_ci_high_ms_b{n}"] = s.median_ci_high * 1e3
        m[f"fp32_latency_p50_ms_b{n}"] = paired.baseline.summary.median * 1e3
        m[f"throughput_per_s_b{n}"] = n / s.median
        m[f"speedup_vs_fp32_b{n}"] = paired.speedup.value
        m[f"speedup_ci_low_b{n}"] = paired.speedup.ci_low
        m[f"speedup_ci_high_b{n}"] = paired.speedup.ci_high
        m[f"latency_cv_b{n}"] = s.cv
        if s.unstable:
            state.warnings.append(
                f"unstable timing at batch {n}: cv {s.cv:.2f}, {s.outliers} outliers"
            )
        samples[f"b{n}"] = {
            "candidate_ms": [t * 1e3 for t in paired.candidate.per_call_s],
            "fp32_ms": [t * 1e3 for t in paired.baseline.per_call_s],
        }
    state.details["latency_samples"] = samples


def _generation(
    trial: TrialSpec,
    out_dir: Path,
    state: _State,
    fp32: torch.nn.Module,
    candidate: torch.nn.Module,
    session: Any,
    data: TaskData,
    method: QuantMethod,
) -> None:
    """Prefill latency, decode tokens/s and KV-cache memory (see measure/generation.py)."""
    spec = trial.measure.generation
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
    if trial.runtime == "onnxruntime":
        decoder = gen.ort_decoder(
            candidate,
            tokens[:, :prompt],
            tokens,
            new_tokens,
            method.export,
            lambda path: ortrt.make_session(path, trial.measure.threads),
            ortrt.as_callable(session),
            out_dir / "generation",
            notes,
        )
    else:
        decoder = gen.torch_decoder(candidate, tokens[:, :prompt], tokens, new_tokens)
    settings = TimingSettings(
        warmup_s=trial.measure.warmup_s,
        min_round_s=trial.measure.min_round_s,
        min_rounds=trial.measure.min_rounds,
        max_time_s=trial.measure.max_time_s,
    )
    weights = state.metrics.get("weight_bytes")
    result = gen.measure_generation(fp32, decoder, tokens, prompt, new_tokens, settings, weights)
    state.metrics.update(result.metrics)
    state.details["generation"] = result.details
    state.warnings.extend(notes + result.warnings)


def _bind(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: model(x)
