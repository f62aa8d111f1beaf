"""One quantization grid per tensor in an exported QDQ graph, so the runtime fuses it.

Each integer layer exports its own QDQ pattern (``Q -> DQ -> Conv/MatMul -> Q -> DQ``): its
input quantized on the grid it calibrated, its output on another. Between two such layers
that leaves a dequantize/requantize pair, and a ReLU, a max-pool or a residual ``Add``
stays in floating point between them; onnxruntime then converts layouts around every float
op and runs them one by one (ResNet-18: 23 DequantizeLinear, 6 float Relu, 8 float Add and
8 Transposes after onnxruntime's optimisations, against 12, 1, 2 and 3 in
``quantize_static``'s graph). :func:`share_grids` rewrites the graph the way quantizers lay
it out from the start:

1. **ReLU before the quantizer**: ``Q -> DQ -> Relu`` becomes ``Relu -> Q -> DQ`` on the
   same scale with the zero point at the grid's lowest integer (exact over the calibrated
   range: ReLU commutes with a grid that holds zero, and its non-negative half keeps its
   values). onnxruntime folds a ReLU that feeds a quantizer with that zero point into the
   conv before it.
2. **One grid per tensor**: a tensor dequantized by a layer and quantized again by its
   consumers (all on one grid, the grid their calibration found for this very tensor) is
   quantized once, on the consumers' grid: ``Q(a) -> DQ(a) -> Q(b) -> DQ(b)`` becomes
   ``Q(b) -> DQ(b)``.
3. **Quantized joins**: the float output of an ``Add`` (or of a ReLU after it, or of a
   ``MaxPool``, whose values the grid carries unchanged) that a quantized layer consumes
   is quantized once on that layer's grid, for every consumer; onnxruntime then runs the
   residual ``Add`` as ``QLinearAdd`` and the pool on integers.

Each rule changes only where a value is rounded to a grid the graph already holds for it,
so the graph computes what the torch model computes up to one rounding step of those grids
(it rounds less often). Graphs without QuantizeLinear are returned unchanged.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

Q, DQ = "QuantizeLinear", "DequantizeLinear"
# Ops whose output holds only values of their input (a grid carries through them unchanged).
_VALUE_PRESERVING = frozenset({"MaxPool", "Relu"})
# Float ops whose output is worth quantizing when a quantized layer reads it.
_JOINS = frozenset({"Add", "Relu", "MaxPool"})


class _Graph:
    """Producers, consumers and constant values of one ONNX graph, rebuilt on demand."""

    def __init__(self, model: onnx.ModelProto, base_dir: str = "") -> None:
        self.graph = model.graph
        self.base_dir = base_dir  # where external data lives
        # Only the quantizers' scales and zero points are ever read: the weights (gigabytes
        # in a large model) stay protobuf, and a constant is converted when first asked for.
        self._sources: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        for node in self.graph.node:  # the exporter writes repeated constants as Identity
            if node.op_type == "Identity" and node.input[0] in self._sources:
                self._sources[node.output[0]] = self._sources[node.input[0]]
            elif node.op_type == "Constant" and node.attribute[0].name == "value":
                self._sources[node.output[0]] = node.attribute[0].t
        self._arrays: dict[str, np.ndarray] = {}
        self.outputs = {o.name for o in self.graph.output}
        self.refresh()

    def constant(self, name: str) -> np.ndarray | None:
        """The value of the constant ``name`` (an initializer, a Constant node's or an
        Identity's of one), or None when ``name`` is computed."""
        if name not in self._arrays:
            source = self._sources.get(name)
            if source is None:
                return None
            self._arrays[name] = numpy_helper.to_array(source, self.base_dir)
        return self._arrays[name]

    def add_constant(self, name: str, value: np.ndarray) -> None:
        """A new initializer ``name`` holding ``value``."""
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self._sources[name] = tensor

    def refresh(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)

    def grid(self, node: onnx.NodeProto) -> tuple[bytes, bytes, str] | None:
        """A per-tensor Q/DQ node's (scale, zero point) as comparable bytes, or None when
        they are not constants or not per tensor."""
        if len(node.input) < 3:
            return None
        scale, zero = self.constant(node.input[1]), self.constant(node.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            return None
        return scale.tobytes(), zero.tobytes(), str(zero.dtype)

    def qdq_pair(self, dq: onnx.NodeProto) -> onnx.NodeProto | None:
        """The Q feeding ``dq`` on the same grid, used by nothing else, or None."""
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != Q or dq.op_type != DQ:
            return None
        if self.grid(q) is None or self.grid(q) != self.grid(dq):
            return None
        if len(self.consumers[q.output[0]]) != 1 or q.output[0] in self.outputs:
            return None
        return q

    def consumer_grid(self, tensor: str) -> onnx.NodeProto | None:
        """The Q node whose grid every quantizing consumer of ``tensor`` shares, or None
        (no quantizing consumer, or consumers on different grids)."""
        quantizers = [n for n in self.consumers[tensor] if n.op_type == Q]
        if not quantizers:
            return None
        grids = {self.grid(n) for n in quantizers}
        if len(grids) != 1 or None in grids:
            return None
        return quantizers[0]


def share_grids(model: onnx.ModelProto, base_dir: str = "") -> int:
    """Apply the three rules of this module to ``model`` in place; returns how many
    rewrites were made (0: the graph is as it was). ``base_dir``: where the graph's
    external data lives (only quantizers' scales and zero points are read)."""
    if not any(node.op_type == Q for node in model.graph.node):
        return 0
    g = _Graph(model, base_dir)
    changes = _hoist_relus(g)
    g.refresh()
    changes += _quantize_joins(g)
    g.refresh()
    changes += _merge_requantizers(g)
    if changes:
        _drop_dead_nodes(model)
    return changes


def _hoist_relus(g: _Graph) -> int:
    """Rule 1: ``x -> Q -> DQ -> Relu -> y`` becomes ``x -> Relu -> Q -> DQ -> y``, the
    grid's zero point moved to its lowest integer (same scale): the non-negative values it
    held keep their integers' values, and onnxruntime folds the ReLU into the layer."""
    count = 0
    for relu in list(g.graph.node):
        if relu.op_type != "Relu":
            continue
        dq = g.producer.get(relu.input[0])
        if dq is None or dq.op_type != DQ or len(g.consumers[dq.output[0]]) != 1:
            continue
        q = g.qdq_pair(dq)
        if q is None or dq.output[0] in g.outputs:
            continue
        source, relu_out = q.input[0], relu.output[0]
        hoisted = relu_out + "_float"
        relu.input[0], relu.output[0] = source, hoisted
        q.input[0] = hoisted
        dq.output[0] = relu_out
        q.input[2] = dq.input[2] = _lowest_zero_point(g, q.input[2])
        _move_before(g.graph, relu, q)
        g.refresh()
        count += 1
    return count


def _lowest_zero_point(g: _Graph, zero_point: str) -> str:
    """The name of a constant zero point at the lowest integer of ``zero_point``'s type."""
    current = g.constant(zero_point)
    assert current is not None  # grid() of the pair read it
    name = f"qdq_sharing_zero_point_{current.dtype}"
    if g.constant(name) is None:
        g.add_constant(name, np.array(np.iinfo(current.dtype).min, dtype=current.dtype))
    return name


def _quantize_joins(g: _Graph) -> int:
    """Rule 3: a float join read by a quantized layer is quantized once, on its grid."""
    count = 0
    for node in list(g.graph.node):
        if node.op_type not in _JOINS:
            continue
        out = node.output[0]
        if out in g.outputs:
            continue
        grid_of = g.consumer_grid(out)
        if grid_of is None or not _float_consumers(g, out):
            continue
        q_out, dq_out = out + "_q", out + "_dq"
        scale, zero = grid_of.input[1], grid_of.input[2]
        new_q = helper.make_node(Q, [out, scale, zero], [q_out], name=q_out)
        new_dq = helper.make_node(DQ, [q_out, scale, zero], [dq_out], name=dq_out)
        for consumer in list(g.consumers[out]):
            for i, name in enumerate(consumer.input):
                if name == out:
                    consumer.input[i] = dq_out
        index = list(g.graph.node).index(node)
        g.graph.node.insert(index + 1, new_dq)
        g.graph.node.insert(index + 1, new_q)
        g.refresh()
        count += 1
    return count


def _merge_requantizers(g: _Graph) -> int:
    """Rule 2: ``Q(a) -> DQ(a) -> Q(b) -> DQ(b)`` becomes ``Q(b) -> DQ(b)``, the first
    quantizer taking the grid that every quantizing consumer of the tensor shares. Through
    a value-preserving op (``DQ(a) -> MaxPool -> Q(b)``) the grid carries too: the pair
    before the op takes ``b`` and onnxruntime runs the op on integers."""
    count = 0
    for name in [n.output[0] for n in g.graph.node if n.op_type == DQ]:
        dq = g.producer.get(name)
        q = g.qdq_pair(dq) if dq is not None else None
        target = _downstream_grid(g, name) if q is not None else None
        if dq is None or q is None or target is None:
            continue
        owner, via = target
        regrid = g.grid(q) != g.grid(owner)
        if regrid:
            q.input[1], q.input[2] = owner.input[1], owner.input[2]
            dq.input[1], dq.input[2] = owner.input[1], owner.input[2]
        merged = 0
        if via is None:  # the consumers' quantizers repeat q now: their DQs read q's integers
            for redundant in [n for n in g.consumers[name] if n.op_type == Q]:
                if redundant.output[0] in g.outputs:
                    continue
                for reader in g.consumers[redundant.output[0]]:
                    for i, read in enumerate(reader.input):
                        if read == redundant.output[0]:
                            reader.input[i] = q.output[0]
                redundant.ClearField("input")
                merged += 1
        if regrid or merged:
            g.refresh()
            count += 1
    return count


def _downstream_grid(g: _Graph, tensor: str) -> tuple[onnx.NodeProto, onnx.NodeProto | None] | None:
    """The quantizer whose grid ``tensor`` should be on: the one its quantizing consumers
    share (with ``None``), or, when its only consumer is a value-preserving op followed by
    a QDQ pair on another grid, that pair's quantizer (with the op). None otherwise."""
    consumers = g.consumers[tensor]
    owner = g.consumer_grid(tensor)
    if owner is not None:
        return owner, None
    if len(consumers) == 1 and consumers[0].op_type in _VALUE_PRESERVING:
        op = consumers[0]
        after = g.consumers[op.output[0]]
        if len(after) == 1 and after[0].op_type == Q and g.grid(after[0]) is not None:
            q_after = after[0]
            readers = g.consumers[q_after.output[0]]
            if readers and all(r.op_type == DQ for r in readers):
                return q_after, op
    return None


def _float_consumers(g: _Graph, tensor: str) -> bool:
    """Whether ``tensor`` has a consumer other than quantizers (else rule 2 suffices)."""
    return any(n.op_type != Q for n in g.consumers[tensor])


def _move_before(graph: onnx.GraphProto, node: onnx.NodeProto, anchor: onnx.NodeProto) -> None:
    """Keep the node list topologically sorted after ``node`` came to feed ``anchor``."""
    nodes = list(graph.node)
    i, j = nodes.index(node), nodes.index(anchor)
    if i < j:
        return
    moved = onnx.NodeProto()
    moved.CopyFrom(node)
    del graph.node[i]
    graph.node.insert(j, moved)


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes and initializers that nothing reads any more (the quantizers rule 2
    made redundant, the grids they held)."""
    graph = model.graph
    while True:
        needed = {o.name for o in graph.output}
        for node in graph.node:
            needed.update(name for name in node.input if name)
        dead = [n for n in graph.node if not any(o in needed for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    unused = [t for t in graph.initializer if t.name not in needed]
    for tensor in unused:
        graph.initializer.remove(tensor)
