"""ONNX form of weight-only layers: ``DequantizeLinear`` of packed integers + ``MatMul``.

:class:`~qatbench.quant.weight_only_linear.WeightOnlyLinear` exports a placeholder node
``qatbench::WeightOnlyMatMul(x, q[in, out] as int8, scales, zero_points?, bias?)`` with
``bits`` and ``block_size`` (0: per output channel) attributes; :func:`lower_weight_only`
replaces each with standard ONNX::

    DequantizeLinear(W, scales[, zero_points], axis, block_size) -> MatMul(x, .) -> Sum(., bias)

``W`` is an initializer of the narrowest ONNX integer type holding the values, packed as
ONNX packs them: ``int4``/``uint4`` (4 and 3 bits: ONNX has no 3-bit type, so 3-bit
weights take 4 bits in the file), ``int2``/``uint2`` (2 bits, opset 25; but see
:func:`onnx_bits`), ``int8``/``uint8`` (5 to 8 bits). Blocked quantization needs opset 21.
Zero points, when present, have the type of ``W``. The file holds exactly the packed
integers and one scale per group, nothing padded.

onnxruntime's graph optimizer fuses each DequantizeLinear+MatMul into its ``MatMulNBits``
integer kernel (block size = group size; per-channel scales are repeated over blocks of
32 in memory), which by default quantizes activations to int8 per block (accuracy level
4). The bias is added with ``Sum``, because onnxruntime would otherwise fuse a 2-D
MatMul+Add into a float ``Gemm`` first, leaving the weights dequantized on every run.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qatbench.quant.packing import pack_bits

DOMAIN = "qatbench"
PLACEHOLDER = "WeightOnlyMatMul"
OPSET_BLOCKED = 21  # DequantizeLinear with block_size and int4/uint4
OPSET_INT2 = 25  # int2/uint2 tensors


def onnx_bits(bits: int, out_features: int | None = None) -> int:
    """Bits per value of the ONNX integer type that stores ``bits``-bit weights.

    2-bit weights of a layer whose output count is not a multiple of 8 take 4 bits:
    onnxruntime 1.32's fused 2-bit ``MatMulNBits`` returns wrong results for them (checked
    against the dequantized weights: errors above 100% at 10 outputs).
    """
    if bits <= 2 and (out_features is None or out_features % 8 == 0):
        return 2
    return 4 if bits <= 4 else 8


def required_opset(bits: int) -> int:
    return OPSET_INT2 if onnx_bits(bits) == 2 else OPSET_BLOCKED


_TYPES = {
    (2, True): TensorProto.INT2,
    (2, False): TensorProto.UINT2,
    (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4,
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
}


def packed_initializer(name: str, values: np.ndarray, width: int, signed: bool) -> TensorProto:
    """An initializer of ``values`` (any shape) as ONNX ``width``-bit integers, packed."""
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = _TYPES[(width, signed)]
    tensor.dims.extend(values.shape)
    # int8 or uint8 codes; copied only where read-only (a memory-mapped weights file)
    flat = torch.from_numpy(np.require(values.ravel(), requirements=("C", "W")))
    tensor.raw_data = pack_bits(flat, width, signed=signed).numpy().tobytes()
    return tensor


def lower_weight_only(model: onnx.ModelProto, base_dir: str = "") -> onnx.ModelProto:
    """Replace every placeholder node by DequantizeLinear + MatMul (in place; returned).
    ``base_dir``: where external data the placeholders' inputs point to lives."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    dropped: set[str] = set()
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type != PLACEHOLDER:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, block = int(attrs["bits"]), int(attrs["block_size"])
        x, q_name, s_name, *optional = node.input
        zp = [name for name in optional[:1] if name]
        bias = [name for name in optional[1:2] if name]
        q = numpy_helper.to_array(inits[q_name], base_dir)
        signed = not zp
        width = onnx_bits(bits, q.shape[1])
        w_name = f"{q_name}_q{bits}"
        graph.initializer.append(packed_initializer(w_name, q, width, signed))
        dropped.add(q_name)
        dq_inputs = [w_name, s_name]
        if zp:
            z_name = f"{zp[0]}_q{bits}"
            zero_points = numpy_helper.to_array(inits[zp[0]], base_dir)
            graph.initializer.append(packed_initializer(z_name, zero_points, width, False))
            dropped.add(zp[0])
            dq_inputs.append(z_name)
        scales = numpy_helper.to_array(inits[s_name], base_dir)
        if block == 0:  # per output channel: scales [1, out] -> [out] along axis 1
            inits[s_name].CopyFrom(numpy_helper.from_array(scales.reshape(-1), s_name))
            if zp:
                _reshape_last(graph, dq_inputs[2], (scales.shape[1],))
            dq = helper.make_node("DequantizeLinear", dq_inputs, [f"{w_name}_dq"], axis=1)
        else:
            dq = helper.make_node(
                "DequantizeLinear", dq_inputs, [f"{w_name}_dq"], axis=0, block_size=block
            )
        if not bias:
            new_nodes += [dq, helper.make_node("MatMul", [x, f"{w_name}_dq"], list(node.output))]
            continue
        # Sum, not Add: see the module docstring.
        product = f"{w_name}_matmul"
        new_nodes += [
            dq,
            helper.make_node("MatMul", [x, f"{w_name}_dq"], [product]),
            helper.make_node("Sum", [product, bias[0]], list(node.output)),
        ]
    if not dropped:
        return model
    kept = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    domains = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(domains)
    return model


def _reshape_last(graph: onnx.GraphProto, name: str, shape: tuple[int, ...]) -> None:
    for init in graph.initializer:
        if init.name == name:
            del init.dims[:]
            init.dims.extend(shape)
            return
