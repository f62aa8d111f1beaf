"""AWQ: scale search, clipping, the stored input scale, ONNX, and the ``awq`` method."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import onnx
import pytest
import torch

from qatbench.errors import PluginError
from qatbench.methods.awq import AwqMethod
from qatbench.methods.rtn import RtnMethod
from qatbench.models.mlp import Mlp, MlpConfig
from qatbench.quant.affine import quantize_per_group
from qatbench.quant.awq import awq_clip, awq_quantize, awq_scales
from qatbench.quant.bitwidth import BitWidth
from qatbench.quant.weight_only_linear import WeightOnlyLinear
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.runtimes.onnx_export import check_onnx, export_onnx


def _inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Inputs whose features differ in magnitude by two orders, as activations do."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]
    return torch.randn(n, k, generator=gen) * magnitude


def _mse(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(((x @ (approx - weight).t()) ** 2).mean())


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    x = _inputs(1024, 128, 1)
    return weight, x[:512], x[512:]


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("clip", [False, True])
def test_awq_beats_round_to_nearest(
    problem: tuple[torch.Tensor, ...], bits: int, group_size: int | None, clip: bool
) -> None:
    weight, calib, test = problem
    quantized, input_scale = awq_quantize(weight, calib, bits, group_size, clip=clip)
    effective = quantized.dequantize() * input_scale
    rtn = quantize_per_group(weight, bits, group_size).dequantize()
    assert _mse(test, weight, effective) < 0.8 * _mse(test, weight, rtn)


def test_alpha_zero_is_round_to_nearest(problem: tuple[torch.Tensor, ...]) -> None:
    weight, calib, _ = problem
    s, alpha = awq_scales(weight, calib, 4, 32, True, grid=1)  # the grid holds alpha = 0 only
    assert alpha == 0.0 and torch.allclose(s, torch.ones_like(s))
    quantized, input_scale = awq_quantize(weight, calib, 4, 32, grid=1, clip=False)
    assert torch.equal(quantized.q, quantize_per_group(weight, 4, 32).q)
    assert torch.allclose(input_scale, torch.ones_like(input_scale))


def test_clipping_never_widens_the_range(problem: tuple[torch.Tensor, ...]) -> None:
    weight, calib, _ = problem
    clipped = awq_clip(weight, calib, 4, 32, symmetric=False)
    plain = quantize_per_group(weight, 4, 32, symmetric=False)
    assert torch.all(clipped.scale <= plain.scale * (1 + 1e-6))


def test_input_scale_is_stored_and_applied(tmp_path: Path) -> None:
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(32, generator=torch.Generator().manual_seed(3))
    x = _inputs(256, 64, 4)
    quantized, input_scale = awq_quantize(weight, x, 4, 32)
    layer = WeightOnlyLinear.from_quantized(quantized, bias, input_scale).eval()
    with torch.inference_mode():
        out = layer(x[:8])
        reference = torch.nn.functional.linear(x[:8], layer.effective_weight(), bias)
    assert float((out - reference).abs().max()) <= 1e-2 * float(reference.abs().max())

    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = WeightOnlyLinear(64, 32, 4, 32, input_scaled=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.inference_mode():
        assert torch.equal(fresh(x[:8]), out)

    path = export_onnx(torch.nn.Sequential(layer), (x[:1],), tmp_path / "awq.onnx")
    assert "Mul" in {node.op_type for node in check_onnx(path).graph.node}
    assert ortrt.kernel_counts(path, 1) == (1, 0)
    got = ortrt.as_callable(ortrt.make_session(path, 1))(x[:8].contiguous())
    assert float((got - out).abs().max()) <= 0.02 * float(out.abs().max())
    assert onnx.load(str(path)).graph.initializer  # weights stored as initializers


def _run(
    method_cls: type, model: torch.nn.Module, calib: torch.Tensor, **options: object
) -> torch.nn.Module:
    method = method_cls(method_cls.Config.model_validate(options), BitWidth.parse("w4"))
    candidate = method.prepare(copy.deepcopy(model))
    if method_cls.capabilities.needs_calibration:
        candidate = method.calibrate(candidate, lambda m: [m(xb) for xb in calib.split(64)])
    return method.convert(candidate).eval()


def test_awq_method_has_lower_output_error_than_rtn() -> None:
    torch.manual_seed(0)
    model = Mlp(MlpConfig(in_features=64, hidden=(64,), num_classes=10)).eval()
    x = _inputs(768, 64, 5)
    calib, test = x[:512], x[512:]
    with torch.inference_mode():
        reference = model(test)
        rtn = float(((_run(RtnMethod, model, calib)(test) - reference) ** 2).mean())
        awq_model = _run(AwqMethod, model, calib, max_rows=256)
        awq = float(((awq_model(test) - reference) ** 2).mean())
    assert isinstance(awq_model.get_submodule("net.1"), WeightOnlyLinear)
    assert awq < 0.8 * rtn, f"awq {awq:.4g} vs rtn {rtn:.4g}"


def test_awq_convert_without_calibration_is_a_plugin_error() -> None:
    model = Mlp(MlpConfig(in_features=64, hidden=(16,))).eval()
    method = AwqMethod(AwqMethod.Config(), BitWidth.parse("w4"))
    with pytest.raises(PluginError, match="not calibrated"):
        method.convert(copy.deepcopy(model))
    with pytest.raises(PluginError, match="saw no calibration data"):
        method.calibrate(copy.deepcopy(model), lambda _m: None)
