"""Quantization primitives: packing, affine (de)quantization, QuantizedLinear, ptq sizes."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch

from qatbench.measure.size import save_torch_artifact
from qatbench.methods.ptq import PtqMethod
from qatbench.models.mlp import Mlp, MlpConfig
from qatbench.quant.affine import (
    asymmetric_qparams,
    dequantize,
    int_range,
    quantize,
    quantize_weight_per_channel,
    symmetric_scale,
)
from qatbench.quant.bitwidth import BitWidth
from qatbench.quant.packing import pack_int4, unpack_int4
from qatbench.quant.quantized_linear import QuantizedLinear
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.runtimes.onnx_export import check_onnx, export_onnx

# ---- packing -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (1,), (2,), (7,), (3, 5), (4, 6), (2, 3, 5)])
def test_pack_int4_round_trip_is_exact(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    q = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)
    packed = pack_int4(q)
    n = q.numel()
    assert packed.dtype == torch.uint8
    assert packed.shape == ((n + 1) // 2,)
    back = unpack_int4(packed, q.shape)
    assert back.dtype == torch.int8
    assert torch.equal(back, q)


def test_pack_int4_extremes_and_nibble_order() -> None:
    q = torch.tensor([-8, 7, 7, -8, 0, -1, 1], dtype=torch.int8)
    packed = pack_int4(q)
    # low nibble first: (-8 & 0xF) | (7 << 4) = 0x8 | 0x70
    assert packed.tolist() == [0x78, 0x87, 0xF0, 0x01]
    assert torch.equal(unpack_int4(packed, q.shape), q)


@pytest.mark.parametrize("bad", [-9, 8, 100, -128])
def test_pack_int4_rejects_out_of_range(bad: int) -> None:
    q = torch.tensor([0, 1, bad], dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(q)


# ---- affine quantization -------------------------------------------------------------


def _float32_slack(lo: float, hi: float) -> float:
    """Rounding of x / scale in float32 may land a tie on either side: a few ulps of |x|."""
    return 8 * torch.finfo(torch.float32).eps * max(abs(lo), abs(hi))


@pytest.mark.parametrize(("lo", "hi"), [(-3.0, 5.0), (0.5, 4.0), (-6.0, -1.0), (-1e-3, 2e-3)])
@pytest.mark.parametrize("bits", [8, 7, 4])
def test_asymmetric_round_trip_error_within_half_step(lo: float, hi: float, bits: int) -> None:
    scale, zp = asymmetric_qparams(torch.tensor(lo), torch.tensor(hi), bits)
    qmin, qmax = int_range(bits, signed=False)
    x = torch.linspace(lo, hi, 1001)
    q = quantize(x, scale, zp, qmin, qmax)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (dequantize(q, scale, zp) - x).abs().max()
    assert float(err) <= float(scale) / 2 + _float32_slack(lo, hi)


@pytest.mark.parametrize(("lo", "hi"), [(-3.0, 5.0), (0.5, 4.0), (-6.0, -1.0), (0.0, 0.0)])
def test_asymmetric_qparams_cover_zero_exactly(lo: float, hi: float) -> None:
    scale, zp = asymmetric_qparams(torch.tensor(lo), torch.tensor(hi), 8)
    qmin, qmax = int_range(8, signed=False)
    assert qmin <= int(zp) <= qmax
    zero = torch.zeros(1)
    assert float(dequantize(quantize(zero, scale, zp, qmin, qmax), scale, zp)) == 0.0
    # the representable range contains both the requested range and zero
    low, high = dequantize(torch.tensor([qmin, qmax]), scale, zp).tolist()
    assert low <= min(lo, 0.0) + float(scale) / 2
    assert high >= max(hi, 0.0) - float(scale) / 2


def test_asymmetric_qparams_for_positive_range_have_zero_point_at_qmin() -> None:
    _, zp = asymmetric_qparams(torch.tensor(2.0), torch.tensor(5.0), 8)
    assert int(zp) == 0
    _, zp = asymmetric_qparams(torch.tensor(-5.0), torch.tensor(-2.0), 8)
    assert int(zp) == 255


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_round_trip_error_and_zero(bits: int) -> None:
    absmax = torch.tensor(2.5)
    scale = symmetric_scale(absmax, bits)
    qmax = 2 ** (bits - 1) - 1
    x = torch.linspace(-2.5, 2.5, 999)
    q = quantize(x, scale, 0, -qmax, qmax)
    assert int(q.min()) == -qmax and int(q.max()) == qmax
    assert float((dequantize(q, scale, 0) - x).abs().max()) <= float(scale) / 2 + _float32_slack(
        -2.5, 2.5
    )
    assert float(dequantize(quantize(torch.zeros(1), scale, 0, -qmax, qmax), scale, 0)) == 0.0


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_weights_error_within_half_step_per_row(bits: int) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 10, generator=gen) * torch.arange(1, 7).unsqueeze(1)
    q, scale = quantize_weight_per_channel(weight, bits)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    qmax = 2 ** (bits - 1) - 1
    assert int(q.abs().max()) <= qmax
    err = (dequantize(q, scale, 0, axis=0) - weight).abs().amax(dim=1)
    assert torch.all(err <= scale / 2 + _float32_slack(0, float(weight.abs().max())))


# ---- QuantizedLinear -----------------------------------------------------------------

IN, OUT = 64, 32


def _float_layer(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(IN, OUT).eval()
    x = torch.randn(16, IN, generator=torch.Generator().manual_seed(seed + 100))
    with torch.no_grad():
        y = linear(x)
    return linear, x, y


def _quantized(bits: int, seed: int = 0) -> tuple[QuantizedLinear, torch.Tensor, torch.Tensor]:
    linear, x, y = _float_layer(seed)
    layer = QuantizedLinear.from_float(linear, bits, (x.min(), x.max()), (y.min(), y.max()))
    return layer.eval(), x, y


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.04), (4, 0.15)])
def test_quantized_linear_close_to_float(bits: int, bound: float) -> None:
    layer, x, y = _quantized(bits)
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == y.shape and out.dtype == torch.float32
    relative = float((out - y).norm() / y.norm())
    assert relative <= bound, f"w{bits}a8 relative error {relative:.4f} > {bound}"


def test_quantized_linear_state_dict_holds_real_integers() -> None:
    layer8, _, _ = _quantized(8)
    sd8 = layer8.state_dict()
    assert sd8["weight_q"].dtype == torch.int8
    assert sd8["weight_q"].numel() == IN * OUT
    layer4, _, _ = _quantized(4)
    sd4 = layer4.state_dict()
    assert sd4["weight_q"].dtype == torch.uint8
    assert sd4["weight_q"].numel() == IN * OUT // 2
    assert not any(t.is_floating_point() and t.numel() >= IN * OUT for t in sd4.values())
    # the packed integers are the per-channel weights of the float layer
    linear, _, _ = _float_layer()
    q, _ = quantize_weight_per_channel(linear.weight, 4)
    assert torch.equal(layer4.int_weight(), q)


def _export(bits: int, tmp_path: Path) -> tuple[QuantizedLinear, torch.Tensor, Path]:
    layer, x, _ = _quantized(bits)
    path = export_onnx(torch.nn.Sequential(layer).eval(), (x[:1],), tmp_path / f"w{bits}.onnx")
    check_onnx(path)
    return layer, x, path


def _int8_tensors(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Every int8 tensor stored in the graph, initializer or Constant node: name -> shape."""
    found = {
        init.name: list(init.dims)
        for init in graph.initializer
        if init.data_type == onnx.TensorProto.INT8
    }
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.INT8:
                    found[node.output[0]] = list(attr.t.dims)
    return found


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_onnx_runs_integer_kernels(bits: int, tmp_path: Path) -> None:
    layer, x, path = _export(bits, tmp_path)
    graph = onnx.load(str(path)).graph
    assert [IN, OUT] in _int8_tensors(graph).values()  # the weight integers, transposed
    float_sizes = [
        onnx.numpy_helper.to_array(init).size
        for init in graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT
    ]
    assert max(float_sizes) < IN * OUT  # no float copy of the weights
    integer, floating = ortrt.kernel_counts(path, 1)
    assert integer > 0, f"no integer kernel after ORT optimisation ({floating} float)"
    run = ortrt.as_callable(ortrt.make_session(path, 1))
    with torch.inference_mode():
        expected = layer(x)
    got = run(x.contiguous())
    # at most one output quantization step, where torch and ORT round a tie differently
    assert float((got - expected).abs().max()) <= float(layer.output_scale) * 1.01


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_onnx_weights_are_int8_initializers(bits: int, tmp_path: Path) -> None:
    """quantized_linear.py promises "the integers become one int8 initializer"; the weights
    must be initializers for ``size.onnx_weight_bytes`` (which reads only initializers)."""
    _, _, path = _export(bits, tmp_path)
    graph = onnx.load(str(path)).graph
    shapes = [
        list(init.dims) for init in graph.initializer if init.data_type == onnx.TensorProto.INT8
    ]
    assert [IN, OUT] in shapes, (
        f"int8 weights are not an initializer; int8 tensors: {_int8_tensors(graph)}"
    )


def test_load_state_dict_resets_prepacked_weights() -> None:
    first, x, _ = _quantized(8, seed=0)
    second, _, _ = _quantized(8, seed=1)
    with torch.inference_mode():
        before = first(x)  # builds and caches the prepacked weights of `first`
        expected = second(x)
    assert not torch.allclose(before, expected)
    first.load_state_dict(second.state_dict())
    with torch.inference_mode():
        after = first(x)
    assert not torch.allclose(after, before)
    assert torch.equal(after, expected)


# ---- ptq on the seed MLP: artifact sizes ---------------------------------------------


@pytest.fixture(scope="module")
def seed_mlp() -> Mlp:
    torch.manual_seed(0)
    return Mlp(MlpConfig()).eval()


def _ptq(model: torch.nn.Module, bits: str) -> torch.nn.Module:
    method = PtqMethod(bits=BitWidth.parse(bits))
    calib = torch.randn(32, 28, 28, generator=torch.Generator().manual_seed(2))

    def forward_loop(m: torch.nn.Module) -> None:
        for xb in calib.split(8):
            m(xb)

    candidate = method.prepare(copy.deepcopy(model))
    candidate = method.calibrate(candidate, forward_loop)
    return method.convert(candidate).eval()


@pytest.mark.parametrize(("bits", "max_ratio"), [("w8a8", 0.26), ("w4a8", 0.14)])
def test_ptq_artifact_is_really_smaller(
    seed_mlp: Mlp, bits: str, max_ratio: float, tmp_path: Path
) -> None:
    assert [m.out_features for m in seed_mlp.modules() if isinstance(m, torch.nn.Linear)] == [
        512,
        256,
        128,
        10,
    ]
    fp32_path, q_path = tmp_path / "fp32.pt", tmp_path / f"{bits}.pt"
    fp32_bytes = save_torch_artifact(seed_mlp, fp32_path)
    q_bytes = save_torch_artifact(_ptq(seed_mlp, bits), q_path)
    assert fp32_bytes == len(fp32_path.read_bytes())
    assert q_bytes == len(q_path.read_bytes())
    assert q_bytes <= max_ratio * fp32_bytes, f"{bits}: {q_bytes} / {fp32_bytes} bytes"
