"""OpenVINO's CPU plugin as a runtime (optional extra: ``pip install 'qatbench[openvino]'``).

``openvino`` runs the exported ONNX graph (fp32, or int8 as QDQ/integer nodes) with
``measure.threads`` inference threads, the latency hint and one stream. The CPU plugin's
default inference precision is bf16 wherever the CPU has AVX512-BF16 or AMX, so an "fp32"
graph would silently compute in bf16 there: ``openvino`` sets the f32 precision hint, and
``openvino_bf16`` (the same runtime with the bf16 hint) is the separate, named
configuration. The precision the compiled model reports is recorded in every trial
(``details.runtime_settings.inference_precision``, also an MLflow param), with a warning
where it is not the one asked for (a CPU without bf16 runs ``openvino_bf16`` in f32).

``int_op_fraction`` is read from the compiled model's runtime graph
(``get_runtime_model()``): the share of its matrix layers (FullyConnected, MatMul,
convolutions) whose ``runtimePrecision`` is i8/u8. Each timing repeat compiles the graph
again and opens a new infer request.

The module imports without openvino; the runtimes stay listed and
:meth:`OpenVino.unavailable_reason` says what to install, which ``qatbench validate``
reports before anything runs.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from qatbench.data.inputs import Batch
from qatbench.errors import PluginError
from qatbench.runtimes.base import (
    ONNX_GRAPH,
    RUNTIME_SETTINGS,
    Loaded,
    Runtime,
    RuntimeCapabilities,
)

INSTALL_HINT = "openvino is not installed: pip install 'qatbench[openvino]'"
DEVICE = "CPU"
# Layers of the compiled (runtime) graph that multiply matrices or convolve.
MATRIX_LAYERS = frozenset(
    {"FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution"}
)
INTEGER_PRECISIONS = frozenset({"i8", "u8", "i4", "u4"})


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise PluginError(f"{INSTALL_HINT} ({exc})") from None
    return openvino


def _type_name(value: Any) -> str:
    """'f32', 'bf16', ... for an ``openvino.Type`` or its string form."""
    getter = getattr(value, "get_type_name", None)
    return str(getter() if getter else value)


def layer_precisions(compiled: Any) -> Counter[tuple[str, str]]:
    """(layerType, runtimePrecision) -> count over the compiled model's matrix layers."""
    counts: Counter[tuple[str, str]] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = str(info["layerType"].astype(str)) if "layerType" in info else ""
        if layer in MATRIX_LAYERS:
            precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
            counts[layer, str(precision).lower()] += 1
    return counts


def _request_call(compiled: Any) -> Loaded:
    """A compiled model's infer request as a :class:`Loaded` call over torch tensors."""
    request = compiled.create_infer_request()
    outputs = len(compiled.outputs)

    def run(*inputs: torch.Tensor) -> Any:
        feed = [np.ascontiguousarray(x.numpy()) for x in inputs]
        result = request.infer(feed, share_inputs=True)
        outs = [torch.from_numpy(np.array(result[i])) for i in range(outputs)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def binder(*inputs: torch.Tensor) -> Callable[[], object]:
        feed = [np.ascontiguousarray(x.numpy()) for x in inputs]  # converted once, untimed
        return lambda: request.infer(feed, share_inputs=True)

    return Loaded(run, binder=binder)


class OpenVino(Runtime):
    """``openvino``: the exported graph on OpenVINO's CPU plugin at f32 (see module)."""

    name = "openvino"
    capabilities = RuntimeCapabilities(artifact=ONNX_GRAPH)
    description = "CPU plugin, latency hint, one stream, f32 inference precision"
    precision_hint: ClassVar[str] = "f32"

    def __init__(self, threads: int = 1) -> None:
        super().__init__(threads)
        self._core: Any = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if importlib.util.find_spec("openvino") is not None else INSTALL_HINT

    def settings(self) -> dict[str, Any]:
        """The CPU plugin's configuration for ``compile_model``."""
        return {
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": self.precision_hint,
        }

    def compile(self, artifact: Any) -> Any:
        """A new compiled model of the graph at ``artifact`` on the CPU plugin."""
        if self._core is None:
            self._core = _openvino().Core()
        model = self._core.read_model(str(Path(artifact)))
        return self._core.compile_model(model, DEVICE, self.settings())

    def load(self, artifact: Any, inputs: Sequence[Batch]) -> Loaded:
        compiled = self.compile(artifact)
        loaded = _request_call(compiled)
        used = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        loaded.details[RUNTIME_SETTINGS] = {
            "inference_precision": used,
            "precision_hint": self.precision_hint,
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "streams": int(compiled.get_property("NUM_STREAMS")),
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
            "openvino": str(_openvino().__version__),
        }
        loaded.details["runtime_layers"] = {
            f"{layer} {precision}": count
            for (layer, precision), count in sorted(layer_precisions(compiled).items())
        }
        if used != self.precision_hint:
            loaded.warnings.append(
                f"{self.name}: asked for {self.precision_hint} inference precision, the CPU "
                f"plugin computes in {used}"
            )
        return loaded

    def integer_fraction(self, artifact: Any) -> float | None:
        counts = layer_precisions(self.compile(artifact))
        integer = sum(n for (_, precision), n in counts.items() if precision in INTEGER_PRECISIONS)
        return integer / max(sum(counts.values()), 1)


class OpenVinoBf16(OpenVino):
    """``openvino_bf16``: the same, with the bf16 inference precision hint (float layers
    compute in bf16 where the CPU has AVX512-BF16 or AMX)."""

    name = "openvino_bf16"
    capabilities = RuntimeCapabilities(artifact=ONNX_GRAPH, precision="bf16")
    description = "CPU plugin, latency hint, one stream, bf16 inference precision"
    precision_hint = "bf16"
