"""ONNX export of a (converted) model, checked with ``onnx.checker``, labelled with metadata.

The TorchScript-based exporter is used: it is an order of magnitude faster than the dynamo
exporter on small models (0.4 s against 6 s for the seed MLP here) and honours the
``symbolic`` hooks through which quantized modules emit their QDQ pattern.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import onnx
import onnx.version_converter
import torch

from qatbench.errors import PluginError
from qatbench.memory import release_free_memory
from qatbench.quant import qdq_sharing, weight_only_onnx
from qatbench.runtimes import onnx_weights

OPSET = 17
TORCHSCRIPT_MAX_OPSET = 20  # the newest opset the TorchScript exporter writes
INPUT_NAME, OUTPUT_NAME = "input", "output"
# Graphs whose weights pass this keep them in one external-data file beside them
# (``model.onnx.data``; see qatbench.runtimes.onnx_weights).
EXTERNAL_DATA_BYTES = onnx_weights.EXTERNAL_DATA_BYTES


def required_opset(model: torch.nn.Module, opset: int = OPSET) -> int:
    """``opset`` raised to what the model's modules need (their ``onnx_opset`` attribute)."""
    needs = [getattr(m, "onnx_opset", 0) for m in model.modules()]
    return max([opset, *needs])


def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    opset: int = OPSET,
) -> Path:
    """Export with a dynamic batch dimension; returns ``path``.

    The opset is ``opset`` or what a module of the model needs, if more (weight-only
    int4 needs 21). Beyond the TorchScript exporter's 20 the graph is exported at 20 and
    converted with ``onnx.version_converter``; placeholder nodes of weight-only layers are
    then lowered to standard ONNX (:mod:`qatbench.quant.weight_only_onnx`). Adjacent
    integer layers' QDQ patterns are joined so that each tensor is quantized once
    (:mod:`qatbench.quant.qdq_sharing`).

    The weights never pass through a protobuf message whole: the exporter writes the graph
    alone and they are streamed to disk (:mod:`qatbench.runtimes.onnx_weights`); the
    graph passes read only the tensors they change. Saved as one file up to
    ``EXTERNAL_DATA_BYTES`` of weights, else with one ``model.onnx.data`` beside it.
    """
    opset = required_opset(model, opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    named = getattr(model, "onnx_input_names", None)  # a model with named inputs
    input_names = (
        list(named)
        if named
        else [INPUT_NAME]
        if len(example_inputs) == 1
        else [f"{INPUT_NAME}{i}" for i in range(len(example_inputs))]
    )
    with (
        warnings.catch_warnings(),
        torch.no_grad(),
        contextlib.ExitStack() as operands,
        onnx_weights.captured_weights() as weights,
    ):
        for module in model.modules():  # tensors a layer computes for its ONNX form
            made = getattr(module, "onnx_export_operands", None)
            if made is not None:
                operands.enter_context(made())
                release_free_memory()  # its temporaries, not under the next layer's
        # The TorchScript exporter announces its own deprecation on every call.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model.eval(),
            example_inputs,
            str(path),
            dynamo=False,
            opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
            input_names=input_names,
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: {0: "batch"} for name in [*input_names, OUTPUT_NAME]},
        )
    model_proto = onnx.load(str(path))  # the graph alone: its weights are in ``weights``
    onnx_weights.attach_weights(model_proto, weights, path)
    del weights  # the tensors constant folding made are freed here
    _constants_to_initializers(model_proto)
    if opset > TORCHSCRIPT_MAX_OPSET:
        model_proto = _convert_opset(model_proto, opset)
    weights_dir = str(path.parent)  # the passes read the few tensors they change
    if any(node.domain == weight_only_onnx.DOMAIN for node in model_proto.graph.node):
        model_proto = weight_only_onnx.lower_weight_only(model_proto, weights_dir)
    qdq_sharing.share_grids(model_proto, weights_dir)  # one grid per tensor between layers
    save_graph(model_proto, path)
    return path


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model`` at ``path``: inline, or with its weights in one external-data file
    ``<name>.data`` beside it when they pass ``EXTERNAL_DATA_BYTES``
    (:func:`qatbench.runtimes.onnx_weights.save_graph`)."""
    onnx_weights.save_graph(model, Path(path), external_bytes=EXTERNAL_DATA_BYTES)


def graph_bytes(path: Path) -> int:
    """Bytes of an exported graph on disk: the file and its external data, if any."""
    path = Path(path)
    data = onnx_weights.data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    converted = onnx.version_converter.convert_version(model, opset)
    ir = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    converted.ir_version = max(converted.ir_version, ir)
    return converted


def _constants_to_initializers(model: onnx.ModelProto) -> bool:
    """Store tensors of Constant nodes as initializers, as a weight should be stored.

    The TorchScript exporter leaves tensors it computed while tracing (the unpacked
    integer weights) in Constant nodes; tools that count or edit weights read initializers.
    Returns whether anything moved.
    """
    graph = model.graph
    moved = []
    for node in graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name != "value" or attr.type != onnx.AttributeProto.TENSOR:
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved.append(node)
    for node in moved:
        graph.node.remove(node)
    return bool(moved)


def check_onnx(path: Path) -> onnx.ModelProto:
    """Run the full ONNX checker (with shape inference) and :func:`check_batch_axis`;
    returns the graph's structure, its weights left on disk (read one with
    ``onnx.numpy_helper.to_array(tensor, str(path.parent))``)."""
    path = Path(path)
    model = onnx_weights.load_structure(path)  # the weights stay on disk
    # The checker reads a copy of the structure beside the graph, whose tensors point
    # into the graph's own files: it checks where they are without loading them.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx") as structure:
        onnx.save(model, structure.name)
        onnx.checker.check_model(structure.name, full_check=True)
    check_batch_axis(model)
    return model


def check_batch_axis(model: onnx.ModelProto) -> None:
    """PluginError unless dimension 0 of every graph input and output is symbolic: the
    trial runs the graph at every batch size of the experiment."""
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            dims = value.type.tensor_type.shape.dim
            if not dims or not dims[0].dim_param:
                shown = dims[0].dim_value if dims else "none"
                raise PluginError(
                    f"exported graph {kind} {value.name!r} has a fixed batch dimension "
                    f"({shown}); export it with dynamic_axes={{name: {{0: 'batch'}}}}"
                )


def default_opset(model: onnx.ModelProto) -> int:
    """The graph's opset of the default (``ai.onnx``) domain."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def write_metadata(path: Path, props: dict[str, str]) -> None:
    """Set ``props`` (and ``qatbench.opset``, read from the graph) in the model's
    ``metadata_props``, replacing entries of the same keys; rewrites ``path``."""
    model = onnx_weights.load_structure(path)
    merged = {p.key: p.value for p in model.metadata_props}
    merged.update(props)
    merged["qatbench.opset"] = str(default_opset(model))
    onnx.helper.set_model_props(model, merged)
    save_graph(model, path)
