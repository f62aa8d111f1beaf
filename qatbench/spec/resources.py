"""Will the experiment fit this machine? Peak memory and disk, estimated before anything is
built from each model's parameter count (the model built on PyTorch's meta device).

A trial holds the fp32 weights, the quantized weights and what its runtime needs: up to
``TORCH_PEAK_X`` times the fp32 weight bytes on a torch runtime and ``GRAPH_PEAK_X`` on a
graph runtime (the ONNX export, and onnxruntime sessions of the graph), as measured on a
0.25B-parameter Llama-shaped decoder (docs/language-models.md), plus the worker's own
libraries. Trials run one at a time, so the sweep's peak is its largest trial's.

On disk, each trial folder keeps what the experiment's ``artifacts:`` and its runtime ask
for (an exported graph, also logged to MLflow as a model, and ``model.pt``), a graph trial
writes the fp32 reference graph for a moment, and an fp32 build or a converted model that
other trials load stays in the sweep's shared folder until the sweep ends
(:mod:`qatbench.trial.shared_fp32`). A quantized model is counted at the method's bits for
the weights of the layer types it quantizes, plus ``SCALE_BITS`` a weight for scales and
zero points, and at fp32 for the rest; the graph twice (folder and MLflow) as an upper
bound. An experiment that does not fit is rejected with one line giving the estimate and
what is available, unless forced (``qatbench validate|run --force``, or
``check_resources: false`` in the experiment).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

from qatbench import registry
from qatbench.errors import ConfigError
from qatbench.quant.bitwidth import BitWidth
from qatbench.runtimes.base import ONNX_GRAPH
from qatbench.spec.checks import resolve_model_factory
from qatbench.spec.schema import ONNX_ARTIFACT, TORCH_ARTIFACT, ExperimentSpec, ModelEntry

TORCH_PEAK_X = 2.5  # measured: 1.7 (fp32) and 2.2 to 2.4 (rtn w4, its conversion)
GRAPH_PEAK_X = 3.0  # measured: 2.9 (fp32: the export's folded weights, one session) and 2.8
WORKER_BYTES = 1 << 29  # libraries and data beyond what the ratios above include
# Folder and MLflow: an upper bound (a graph kept as one file, up to 2 GiB of weights, is
# one hard link in a local store; a larger one keeps a copy of its external data).
ONNX_COPIES = 2
SCALE_BITS = 2  # a float scale and zero point per group of 32 weights
GIB = float(1 << 30)


@dataclass(frozen=True)
class Estimate:
    """The sweep's needs: its largest trial's resident peak and the bytes it writes."""

    memory_bytes: int
    disk_bytes: int
    parameters: int
    fp32_weight_bytes: int
    worst: str  # the trial id of the largest peak


def shown_bytes(count: int) -> str:
    """``count`` bytes in GiB, or MiB below one GiB."""
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class ModelSize:
    """A model's floating-point parameters, and their bytes by the type of layer holding
    them (``Linear``, ``Conv2d``, ...; ``""`` for the rest), as fp32."""

    parameters: int
    bytes_by_layer_type: dict[str, int]

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.parameters

    def quantized_bytes(self, layer_types: frozenset[str], weight_bits: int) -> int:
        """Bytes of the model with ``layer_types``' weights at ``weight_bits``."""
        quantized = sum(n for kind, n in self.bytes_by_layer_type.items() if kind in layer_types)
        per_weight = min(weight_bits + SCALE_BITS, 32) / 32
        return self.fp32_bytes - quantized + int(quantized * per_weight)


def model_size(entry: ModelEntry) -> ModelSize | None:
    """``entry``'s model built on the meta device, measured; None where its factory cannot
    build there."""
    import torch

    try:
        with torch.device("meta"):
            model, _example = resolve_model_factory(entry)(**entry.options)
    except Exception:  # no verdict where the factory cannot build on meta
        return None
    if not isinstance(model, torch.nn.Module):
        return None
    seen: set[int] = set()
    by_type: dict[str, int] = {}
    for module in model.modules():
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if id(t) in seen or not t.is_floating_point():
                continue
            seen.add(id(t))
            kind = type(module).__name__ if t is getattr(module, "weight", None) else ""
            by_type[kind] = by_type.get(kind, 0) + 4 * t.numel()
    return ModelSize(sum(by_type.values()) // 4, by_type)


def estimate(spec: ExperimentSpec) -> Estimate | None:
    """What ``spec``'s sweep needs, or None where no model's size could be known."""
    sizes = {entry.key: model_size(entry) for entry in spec.models}
    disk = transient = 0
    worst: Estimate | None = None
    conversions: dict[str, list[int]] = {}
    builds: dict[str, list[int]] = {}
    for trial in spec.expand():
        size = sizes.get(trial.model.key)
        if size is None:
            continue
        weights = size.fp32_bytes
        method = registry.methods.get(trial.method.name)
        caps = method.capabilities
        bits = BitWidth.parse(trial.bits).weight
        kept_bytes = size.quantized_bytes(caps.layer_types, bits) if caps.quantizes else weights
        runs_graph = registry.runtimes.get(trial.runtime).capabilities.artifact == ONNX_GRAPH
        peak = int(weights * (GRAPH_PEAK_X if runs_graph else TORCH_PEAK_X)) + WORKER_BYTES
        kept = ONNX_COPIES * int(runs_graph or ONNX_ARTIFACT in trial.artifacts)
        kept += int(TORCH_ARTIFACT in trial.artifacts)
        disk += kept * kept_bytes
        if runs_graph:  # the fp32 reference graph, written and removed again
            transient = max(transient, weights)
        builds.setdefault(trial.build_key(), []).append(weights)
        if caps.reusable_model and caps.quantizes:
            conversions.setdefault(trial.conversion_key(), []).append(kept_bytes)
        if worst is None or peak > worst.memory_bytes:
            worst = Estimate(peak, 0, size.parameters, weights, trial.id)
    if worst is None:
        return None
    # fp32 builds and converted models other trials load, kept until the sweep ends
    shared = (*builds.values(), *conversions.values())
    disk += transient + sum(group[0] for group in shared if len(group) > 1)
    return Estimate(
        worst.memory_bytes, disk, worst.parameters, worst.fp32_weight_bytes, worst.worst
    )


def check_fits(spec: ExperimentSpec, source: str, output_dir: Path) -> Estimate | None:
    """Raise :class:`ConfigError` when ``spec``'s sweep will not fit in this machine's
    available memory or on ``output_dir``'s disk; returns the estimate."""
    if not spec.check_resources:
        return None
    found = estimate(spec)
    if found is None:
        return None
    available = psutil.virtual_memory().available
    forcing = "; pass --force or set check_resources: false to run anyway"
    if found.memory_bytes > available:
        raise ConfigError(
            f"{source}: trial {found.worst} needs about {found.memory_bytes / GIB:.1f} GiB of "
            f"memory ({found.parameters / 1e9:.2f}B parameters, "
            f"{found.fp32_weight_bytes / GIB:.1f} GiB of fp32 weights) and "
            f"{available / GIB:.1f} GiB are available{forcing}"
        )
    where = output_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if found.disk_bytes > free:
        raise ConfigError(
            f"{source}: the sweep writes up to {found.disk_bytes / GIB:.1f} GiB under "
            f"{output_dir} and {free / GIB:.1f} GiB are free there{forcing}"
        )
    return found
