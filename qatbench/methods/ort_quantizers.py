"""onnxruntime's own quantizers as peers: ``ort_dynamic``, ``ort_static`` and ``ort_int4``.

They quantize the exported fp32 ONNX graph, not the torch model, so their work happens in
``export``: the torch model stays fp32 (``convert`` changes nothing) and only the
``onnxruntime`` runtime can execute what they produce. Before quantizing, 2-D ``Gemm``
nodes (what the TorchScript exporter emits for ``nn.Linear`` on matrices) are rewritten
as ``MatMul`` + ``Add``, because ``quantize_dynamic`` and the MatMulNBits quantizer only
look at ``MatMul``.

- ``ort_dynamic``: ``quantize_dynamic``, int8 weights, uint8 activations quantized per
  call (runs as ``DynamicQuantizeMatMul``).
- ``ort_static``: ``quantize_static`` in QDQ format with the runner's calibration batches
  (recorded during ``calibrate`` and replayed through a ``CalibrationDataReader``). By
  default it quantizes ``MatMul``/``Gemm`` and, when the graph holds any, ``Conv`` (as
  ``quantize_static`` would, fused to ``QLinearConv``); not every op, since QDQ around
  every op can wreck the accuracy of normalisation and softmax in transformers.
  ``quantize_static`` leaves temporary files in the working directory, so it runs in a
  temporary one.
- ``ort_int4``: the ``MatMulNBits`` quantizer, block-wise 4-bit weights, activations in
  floating point (``accuracy_level`` 4 computes with int8 activations instead).

On x86 without VNNI, onnxruntime's u8s8 kernels saturate int16 pair sums, so
``reduce_range`` (7-bit weights) defaults to on for the int8 adapters.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from pydantic import Field

from qatbench.errors import PluginError
from qatbench.methods.base import (
    LINEAR_AND_CONV,
    Capabilities,
    ForwardLoop,
    MethodConfig,
    QuantMethod,
)
from qatbench.runtimes.onnx_export import export_onnx, save_graph

ORT_ONLY = frozenset({"onnxruntime"})
INT8 = frozenset({8})


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(A, B_const, C)`` (alpha = beta = 1, A not transposed) as MatMul + Add.

    Returns how many nodes were rewritten; other Gemms are left as they are.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    rewritten = 0
    for index, node in reversed(list(enumerate(graph.node))):
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            continue
        if attrs.get("beta", 1.0) != 1.0:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        name = node.name or f"gemm{index}"
        weight_name = f"{name}_matmul_weight"
        graph.initializer.append(numpy_helper.from_array(weight, weight_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{name}_matmul_out" if has_bias else node.output[0]
        nodes = [onnx.helper.make_node("MatMul", [node.input[0], weight_name], [mm_out], name)]
        if has_bias:
            nodes.append(
                onnx.helper.make_node(
                    "Add", [mm_out, node.input[2]], [node.output[0]], f"{name}_bias"
                )
            )
        del graph.node[index]
        for offset, new in enumerate(nodes):
            graph.node.insert(index + offset, new)
        rewritten += 1
    if rewritten:
        used = {i for n in graph.node for i in n.input}
        keep = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return rewritten


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """The quantizers log advice and progress on every call (through the root logger and
    their own INFO-level loggers); keep that out of trial output."""
    names = [""] + [
        name for name in logging.root.manager.loggerDict if name.startswith("onnxruntime")
    ]
    names.append("onnxruntime.quantization.matmul_nbits_quantizer")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _fp32_graph(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """Export ``model`` in fp32 to ``path`` with Gemm nodes rewritten as MatMul + Add and
    shared initializers given back to each user (see :func:`_unshare_initializers`)."""
    export_onnx(model, example, path)
    proto = onnx.load(str(path))
    rewritten = gemm_to_matmul(proto)
    if _unshare_initializers(proto) or rewritten:
        save_graph(proto, path)
    return path


def _unshare_initializers(proto: onnx.ModelProto) -> int:
    """Replace ``Identity`` nodes over initializers by copies of the initializer.

    The TorchScript exporter deduplicates equal constants (e.g. the all-zero biases of
    convolutions with BatchNorm folded in) and reads the copies through ``Identity``;
    ``quantize_static`` then cannot quantize those biases and onnxruntime does not fuse the
    conv to ``QLinearConv``. Returns how many nodes were replaced.
    """
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    replaced = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]
    for node in replaced:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    return len(replaced)


class _OrtQuantizer(QuantMethod):
    """Common ground: the torch model stays fp32; ``export`` writes the quantized graph."""

    def export(
        self, model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path
    ) -> Path:
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"qatbench-{self.name}-") as tmp:
            fp32 = _fp32_graph(model, example_inputs, Path(tmp) / "fp32.onnx")
            with _quiet_ort_logging(), contextlib.chdir(tmp):
                self._quantize(fp32, path)
        if not path.is_file():
            raise PluginError(f"{self.name}: onnxruntime's quantizer wrote no model")
        return path

    def _quantize(self, fp32: Path, out: Path) -> None:
        raise NotImplementedError


class _Int8Options(MethodConfig):
    per_channel: bool = Field(True, description="one weight scale per output channel")
    reduce_range: bool = Field(
        True, description="7-bit weights: x86 u8s8 kernels without VNNI saturate int16 sums"
    )
    op_types: list[str] = Field(
        default_factory=lambda: ["MatMul"],
        description="ONNX op types to quantize (Gemm nodes are rewritten as MatMul first)",
    )
    nodes_to_exclude: list[str] = Field(
        default_factory=list, description="ONNX node names left in floating point"
    )


class OrtDynamicMethod(_OrtQuantizer):
    """``onnxruntime.quantization.quantize_dynamic``: int8 weights, per-call activations."""

    name = "ort_dynamic"
    capabilities = Capabilities(weight_bits=INT8, activation_bits=INT8, runtimes=ORT_ONLY)
    Config = _Int8Options

    def _quantize(self, fp32: Path, out: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        cfg = self.config
        quantize_dynamic(
            fp32,
            out,
            op_types_to_quantize=list(cfg.op_types),
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(cfg.nodes_to_exclude),
        )


class _Replay:
    """A ``CalibrationDataReader`` over recorded input batches."""

    def __init__(self, names: list[str], batches: list[tuple[np.ndarray, ...]]) -> None:
        self._feeds = iter([dict(zip(names, batch, strict=True)) for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


class InputRecorder(torch.nn.Module):
    """Runs ``model`` and keeps a copy of every input batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batches: list[tuple[np.ndarray, ...]] = []

    def forward(self, *inputs: torch.Tensor) -> Any:
        # as the graph takes them: floats as fp32, integer inputs (token ids) as they are
        self.batches.append(
            tuple(
                (x.detach().float() if x.is_floating_point() else x.detach()).numpy().copy()
                for x in inputs
            )
        )
        return self.model(*inputs)


class OrtStaticMethod(_OrtQuantizer):
    """``quantize_static`` (QDQ) calibrated on the runner's calibration batches."""

    name = "ort_static"
    capabilities = Capabilities(
        weight_bits=INT8,
        activation_bits=INT8,
        needs_calibration=True,
        runtimes=ORT_ONLY,
        layer_types=LINEAR_AND_CONV,
    )

    class Config(_Int8Options):
        op_types: list[str] | None = Field(  # type: ignore[assignment]  # None: by graph
            None,
            description="ONNX op types to quantize; default MatMul, plus Conv where the "
            "graph holds Conv (Gemm nodes are rewritten as MatMul first)",
        )
        calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
            "minmax", description="how onnxruntime turns calibration data into ranges"
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches: list[tuple[np.ndarray, ...]] = []

    def calibrate(self, model: torch.nn.Module, forward_loop: ForwardLoop) -> torch.nn.Module:
        recorder = InputRecorder(model)
        with torch.no_grad():
            forward_loop(recorder)
        self._batches = recorder.batches
        return model

    def _quantize(self, fp32: Path, out: Path) -> None:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        if not self._batches:
            raise PluginError(f"{self.name}: no calibration data; calibrate() must run first")
        names = [i.name for i in onnx.load(str(fp32)).graph.input]
        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        cfg = self.config
        op_types = cfg.op_types
        if op_types is None:
            held = {node.op_type for node in onnx.load(str(fp32)).graph.node}
            op_types = ["MatMul", *(["Conv"] if "Conv" in held else [])]
        quantize_static(
            fp32,
            out,
            _Replay(names, self._batches),  # type: ignore[arg-type]  # duck-typed reader
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(cfg.nodes_to_exclude),
            calibrate_method=methods[cfg.calibrate_method],
        )


class OrtInt4Method(_OrtQuantizer):
    """onnxruntime's MatMulNBits quantizer: block-wise 4-bit weights (``w4``)."""

    name = "ort_int4"
    capabilities = Capabilities(weight_bits=frozenset({4}), weight_only=True, runtimes=ORT_ONLY)

    class Config(MethodConfig):
        block_size: Literal[16, 32, 64, 128, 256] = Field(
            32, description="weights per scale along the input dimension"
        )
        symmetric: bool = Field(
            False, description="symmetric blocks (no zero points); asymmetric is more accurate"
        )
        accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
            0,
            description="onnxruntime's compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, "
            "4 int8 activations",
        )
        nodes_to_exclude: list[str] = Field(
            default_factory=list, description="ONNX node names left in floating point"
        )

    def _quantize(self, fp32: Path, out: Path) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        cfg = self.config
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(fp32)),
            bits=self.bits.weight,
            block_size=cfg.block_size,
            is_symmetric=cfg.symmetric,
            accuracy_level=cfg.accuracy_level or None,
            nodes_to_exclude=list(cfg.nodes_to_exclude),
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
