"""One trial's model built, pretrained, quantized and converted in this process, as a
worker would, ready to be timed (``quantized_benchmark``), with its error against fp32."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qatbench.data.inputs import Batch
    from qatbench.spec.schema import TrialSpec


@dataclass
class QuantizedModel:
    """A converted model ready to call, an input batch, and its error against fp32.

    Unpacks as ``model, x = quantized``. ``model`` is the converted torch module (runtime
    ``torch``) or a function running the exported graph in onnxruntime (``onnxruntime``).
    """

    trial: TrialSpec
    model: Callable[..., Any]
    inputs: Batch
    metrics: dict[str, float] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.inputs))


def quantize(trial: TrialSpec, out_dir: Path, batch: int) -> QuantizedModel:
    """Build, pretrain (cached), prepare, calibrate, train and convert ``trial``'s model in
    this process, as a trial's worker does, and measure its output error on the evaluation
    set. For the onnxruntime runtime the model is exported and run by onnxruntime."""
    import torch

    from qatbench.data.datasets import load_data
    from qatbench.data.inputs import as_batch, batch_of, call
    from qatbench.data.training import forward_loop, train_loop
    from qatbench.measure import error as err
    from qatbench.methods.lifecycle import quantize_copy
    from qatbench.runtimes.base import ONNX_GRAPH
    from qatbench.trial.lifecycle import build_model, method_for, pretrained_for
    from qatbench.trial.measure_phase import runtime_for

    torch.set_num_threads(trial.measure.threads)
    torch.manual_seed(trial.seed)
    fp32, example = build_model(trial)
    data = load_data(trial.data, as_batch(example), trial.seed)
    if data.labelled and trial.data.pretrain_epochs:
        fp32, _ = pretrained_for(trial, fp32, data)  # the worker's cache: shared weights
    fp32.eval()
    method = method_for(trial)
    model = quantize_copy(  # the worker's driver and checks, untimed
        method,
        fp32,
        forward_loop=lambda: forward_loop(data, trial.data.batch_size),
        train_loop=lambda: train_loop(data, trial.data.batch_size, trial.seed),
    )
    runtime = runtime_for(trial)
    artifact: Any = model
    if runtime.capabilities.artifact == ONNX_GRAPH:
        artifact = out_dir / "model.onnx"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        method.export(model, example, artifact)
    shapes = [*data.eval_x.split(trial.data.batch_size), batch_of(data.eval_x, batch)]
    run: Callable[[torch.Tensor], torch.Tensor] = runtime.load(artifact, shapes).fn
    with torch.inference_mode():
        splits = data.eval_x.split(trial.data.batch_size)
        reference = torch.cat([call(fp32, xb) for xb in splits])
        outputs = torch.cat([call(run, xb) for xb in splits])
    metrics = err.output_error(reference, outputs)
    if data.eval_y is not None:
        metrics["accuracy"] = err.accuracy_percent(outputs, data.eval_y)
        metrics["accuracy_delta_vs_fp32"] = metrics["accuracy"] - err.accuracy_percent(
            reference, data.eval_y
        )
    return QuantizedModel(trial, run, batch_of(data.eval_x, batch), metrics)
