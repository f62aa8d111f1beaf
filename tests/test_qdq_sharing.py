"""One grid per tensor in exported QDQ graphs (qatbench.quant.qdq_sharing): exact rewrites
on hand-built graphs, and a CNN whose residual joins onnxruntime then runs on integers."""

from __future__ import annotations

import collections
import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qatbench.methods.ptq import PtqMethod
from qatbench.methods.qat import QatMethod
from qatbench.models.cnn import build_resnet_tiny
from qatbench.quant import qdq_sharing
from qatbench.quant.bitwidth import BitWidth
from qatbench.runtimes.onnx_export import export_onnx


def _grid(name: str, scale: float, zero: int) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{name}_s"),
        numpy_helper.from_array(np.array(zero, dtype=np.uint8), f"{name}_z"),
    ]


def _qdq(tensor: str, grid: str, out: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("QuantizeLinear", [tensor, f"{grid}_s", f"{grid}_z"], [out + "_q"]),
        helper.make_node("DequantizeLinear", [out + "_q", f"{grid}_s", f"{grid}_z"], [out]),
    ]


def _model(nodes: list[onnx.NodeProto], grids: list[onnx.TensorProto], outputs: list[str]):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [4, 8]) for o in outputs],
        initializer=grids,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)


X = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32) * 3


def test_a_relu_after_a_qdq_pair_moves_before_it_and_the_output_is_unchanged() -> None:
    nodes = [*_qdq("x", "a", "y"), helper.make_node("Relu", ["y"], ["out"])]
    model = _model(nodes, _grid("a", 0.05, 128), ["out"])
    x = np.clip(X, -6.4, 6.35)  # within the grid's range
    before = _run(model, x)[0]
    assert qdq_sharing.share_grids(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Relu", "QuantizeLinear", "DequantizeLinear"]
    q = model.graph.node[1]
    zero = next(t for t in model.graph.initializer if t.name == q.input[2])
    assert numpy_helper.to_array(zero) == 0  # onnxruntime folds a ReLU only into this
    np.testing.assert_array_equal(_run(model, x)[0], before)
    assert (before == 0).any() and (before > 0).any()  # the ReLU did cut something


def test_a_requantized_tensor_is_quantized_once_on_its_consumers_grid() -> None:
    # Q(a) -> DQ(a) -> Q(b) -> DQ(b): the second grid was calibrated for the same tensor
    nodes = [*_qdq("x", "a", "y"), *_qdq("y", "b", "out")]
    model = _model(nodes, [*_grid("a", 0.05, 128), *_grid("b", 0.03, 100)], ["out"])
    assert qdq_sharing.share_grids(model) == 1
    assert _ops(model) == {"QuantizeLinear": 1, "DequantizeLinear": 1}
    (q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert list(q.input[1:]) == ["b_s", "b_z"]
    on_b = (np.clip(np.round(X / 0.03) + 100, 0, 255) - 100) * 0.03
    np.testing.assert_allclose(_run(model, X)[0], on_b, rtol=1e-5, atol=1e-6)
    assert not {"a_s", "a_z"} & {t.name for t in model.graph.initializer}  # unused grid dropped


def test_consumers_on_different_grids_keep_their_own_quantizers() -> None:
    nodes = [*_qdq("x", "a", "y"), *_qdq("y", "b", "o1"), *_qdq("y", "c", "o2")]
    grids = [*_grid("a", 0.05, 128), *_grid("b", 0.03, 100), *_grid("c", 0.02, 90)]
    model = _model(nodes, grids, ["o1", "o2"])
    before = _run(model, X)
    assert qdq_sharing.share_grids(model) == 0
    assert _ops(model) == {"QuantizeLinear": 3, "DequantizeLinear": 3}
    for got, want in zip(_run(model, X), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_float_join_read_by_a_quantized_layer_is_quantized_once_for_every_reader() -> None:
    # Add -> Relu feeds a quantizer (the next layer) and a float reader (the next residual)
    nodes = [
        *_qdq("x", "a", "y"),
        helper.make_node("Add", ["y", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        *_qdq("r", "b", "next_in"),
        helper.make_node("Add", ["r", "next_in"], ["out"]),
    ]
    model = _model(nodes, [*_grid("a", 0.05, 128), *_grid("b", 0.04, 0)], ["out"])
    assert qdq_sharing.share_grids(model) >= 1
    relu_out = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    readers = [n for n in model.graph.node if relu_out in n.input]
    assert [n.op_type for n in readers] == ["QuantizeLinear"]  # every reader sees grid b
    assert _ops(model)["QuantizeLinear"] == 2
    r = np.maximum(np.clip(np.round(X / 0.05) + 128, 0, 255) * 0.05 - 6.4 + X, 0)
    on_b = np.clip(np.round(r / 0.04), 0, 255) * 0.04
    np.testing.assert_allclose(_run(model, X)[0], 2 * on_b, rtol=1e-5, atol=1e-5)


def test_a_graph_without_quantizers_is_left_as_it_was() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["out"])], [], ["out"])
    before = model.SerializeToString()
    assert qdq_sharing.share_grids(model) == 0
    assert model.SerializeToString() == before


@pytest.fixture(scope="module")
def resnet_graphs(tmp_path_factory: pytest.TempPathFactory):
    """resnet_tiny (BatchNorm, residual Adds, a depthwise block) converted by ptq, exported
    with and without the rewrite."""
    torch.manual_seed(0)
    model, (example,) = build_resnet_tiny()
    model.eval()
    x = torch.randn(16, *example.shape[1:])
    method = PtqMethod(bits=BitWidth.parse("w8a8"))
    converted = method.prepare(copy.deepcopy(model))
    converted = method.convert(method.calibrate(converted, lambda m: m(x))).eval()
    folder = tmp_path_factory.mktemp("qdq")
    shared = export_onnx(converted, (example,), folder / "shared.onnx")
    patch = pytest.MonkeyPatch()
    patch.setattr(qdq_sharing, "share_grids", lambda model, base_dir="": 0)
    plain = export_onnx(converted, (example,), folder / "plain.onnx")
    patch.undo()
    with torch.no_grad():
        reference = converted(x).numpy()
    return shared, plain, x.numpy(), reference


def _optimized_ops(path: Path) -> collections.Counter[str]:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return _ops(onnx.load(options.optimized_model_filepath))


def test_a_qat_cnn_keeps_every_conv_integer(tmp_path: Path) -> None:
    # QAT clamps each conv's input before its quantizer: the conv's own output grid stays,
    # and a ReLU moved before it must leave onnxruntime able to fold it into QLinearConv
    torch.manual_seed(0)
    model, (example,) = build_resnet_tiny()
    x = torch.randn(16, *example.shape[1:])
    method = QatMethod(QatMethod.Config(steps=1), BitWidth.parse("w4a8"))
    converted = method.convert(
        method.calibrate(method.prepare(copy.deepcopy(model)), lambda m: m(x))
    )
    path = export_onnx(converted.eval(), (example,), tmp_path / "qat.onnx")
    ops = _optimized_ops(path)
    assert ops["QLinearConv"] == 9 and ops["Conv"] == ops["FusedConv"] == 0


def test_a_cnn_graph_runs_its_residual_adds_and_relus_on_integers(resnet_graphs) -> None:
    shared, plain, _, _ = resnet_graphs
    before, after = _optimized_ops(plain), _optimized_ops(shared)
    assert before["Add"] >= 3 and before["QLinearAdd"] == 0  # the residual joins, in float
    assert after["QLinearAdd"] >= 2 and after["Add"] <= 1  # the last join feeds the pool
    assert after["Relu"] == 0
    assert after["DequantizeLinear"] < before["DequantizeLinear"] / 2
    assert after["QLinearConv"] == before["QLinearConv"] == 9


def test_the_rewritten_cnn_graph_computes_what_the_torch_model_does(resnet_graphs) -> None:
    shared, plain, x, reference = resnet_graphs

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))

    assert cosine(run(plain), reference) > 0.999
    assert cosine(run(shared), reference) > 0.995  # rounded on fewer, shared grids
