"""GPTQ: the algorithm against round-to-nearest, its edge cases, and the ``gptq`` method."""

from __future__ import annotations

import copy

import pytest
import torch

from qatbench.errors import PluginError
from qatbench.methods.gptq import GptqMethod
from qatbench.methods.rtn import RtnMethod
from qatbench.models.mlp import Mlp, MlpConfig
from qatbench.quant.affine import int_range, quantize_per_group
from qatbench.quant.bitwidth import BitWidth
from qatbench.quant.gptq import HessianAccumulator, gptq_quantize
from qatbench.quant.weight_only_linear import WeightOnlyLinear


def _correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features (a random mixing of a few factors), where
    GPTQ's error feedback has something to exploit."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k // 4, k, generator=gen)
    return torch.randn(n, k // 4, generator=gen) @ mixing + 0.1 * torch.randn(n, k, generator=gen)


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k, n = 128, 64
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    x = _correlated_inputs(1536, k, 1)
    calib, test = x[:1024], x[1024:]
    acc = HessianAccumulator(k)
    for xb in calib.split(100):
        acc.add(xb)
    return weight, acc.hessian, calib, test


def _output_mse(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ approx.t() - x @ weight.t()) ** 2).mean())


def test_hessian_is_twice_the_mean_outer_product() -> None:
    x = torch.randn(3, 10, 6, generator=torch.Generator().manual_seed(0))  # 3-D like tokens
    acc = HessianAccumulator(6)
    acc.add(x[:1])
    acc.add(x[1:])
    rows = x.reshape(-1, 6).double()
    assert acc.samples == 30
    assert torch.allclose(acc.hessian, 2 * rows.t() @ rows / 30)


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_round_to_nearest(
    problem: tuple[torch.Tensor, ...],
    bits: int,
    group_size: int | None,
    act_order: bool,
    symmetric: bool,
) -> None:
    weight, hessian, _, test = problem
    gptq = gptq_quantize(weight, hessian, bits, group_size, symmetric, act_order=act_order)
    rtn = quantize_per_group(weight, bits, group_size, symmetric)
    lo, hi = int_range(bits, signed=symmetric)
    assert int(gptq.q.min()) >= lo and int(gptq.q.max()) <= hi
    assert gptq.scale.shape == rtn.scale.shape
    gptq_mse = _output_mse(weight, gptq.dequantize(), test)
    rtn_mse = _output_mse(weight, rtn.dequantize(), test)
    assert gptq_mse < 0.8 * rtn_mse, f"gptq {gptq_mse:.4g} vs rtn {rtn_mse:.4g}"


@pytest.mark.parametrize("group_size", [None, 32])
def test_uncorrelated_inputs_reduce_gptq_to_round_to_nearest(group_size: int | None) -> None:
    """With a diagonal Hessian no error is fed forward: GPTQ picks RTN's integers."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    hessian = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.5)
    gptq = gptq_quantize(weight, hessian, 4, group_size, block_size=16)
    rtn = quantize_per_group(weight, 4, group_size)
    assert torch.equal(gptq.q, rtn.q)
    assert torch.allclose(gptq.scale, rtn.scale)


def test_act_order_keeps_contiguous_groups() -> None:
    """With act_order, group parameters come from the original contiguous groups."""
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    x = _correlated_inputs(256, 64, 7)
    hessian = 2 * x.t().double() @ x.double() / 256
    gq = gptq_quantize(weight, hessian, 4, 16, act_order=True)
    assert torch.allclose(gq.scale, quantize_per_group(weight, 4, 16).scale)


def test_dead_inputs_get_zero_weights() -> None:
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(8))
    x = _correlated_inputs(128, 32, 9)
    x[:, 5] = 0.0  # an input that is never active
    hessian = 2 * x.t().double() @ x.double() / 128
    gq = gptq_quantize(weight, hessian, 4, None)
    assert torch.all(gq.dequantize()[:, 5] == 0)


def test_group_size_must_divide() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(torch.ones(2, 48), torch.eye(48), 4, 32)


# ---- the method ------------------------------------------------------------------------------


def _mlp_and_data() -> tuple[Mlp, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Mlp(MlpConfig(in_features=64, hidden=(64,), num_classes=10)).eval()
    x = _correlated_inputs(768, 64, 10)
    return model, x[:512], x[512:]


def _run(
    method_cls: type, bits: str, model: torch.nn.Module, calib: torch.Tensor, **options: object
) -> torch.nn.Module:
    method = method_cls(method_cls.Config.model_validate(options), BitWidth.parse(bits))
    candidate = method.prepare(copy.deepcopy(model))
    if method_cls.capabilities.needs_calibration:

        def forward_loop(m: torch.nn.Module) -> None:
            for xb in calib.split(64):
                m(xb)

        candidate = method.calibrate(candidate, forward_loop)
    return method.convert(candidate).eval()


@pytest.mark.parametrize("bits", ["w4", "w3"])
@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_method_has_lower_output_error_than_rtn(bits: str, sequential: bool) -> None:
    model, calib, test = _mlp_and_data()
    with torch.inference_mode():
        reference = model(test)
        rtn_out = _run(RtnMethod, bits, model, calib)(test)
        gptq_model = _run(GptqMethod, bits, model, calib, sequential=sequential)
        gptq_out = gptq_model(test)
    assert all(
        isinstance(gptq_model.get_submodule(n), WeightOnlyLinear) for n in ("net.1", "net.3")
    )
    rtn_mse = float(((rtn_out - reference) ** 2).mean())
    gptq_mse = float(((gptq_out - reference) ** 2).mean())
    assert gptq_mse < 0.8 * rtn_mse, f"{bits}: gptq {gptq_mse:.4g} vs rtn {rtn_mse:.4g}"


def test_gptq_options_reach_the_layers() -> None:
    model, calib, _ = _mlp_and_data()
    converted = _run(
        GptqMethod, "w4", model, calib, group_size=32, symmetric=False, keep_fp32=["<last>"]
    )
    first = converted.get_submodule("net.1")
    assert isinstance(first, WeightOnlyLinear)
    assert (first.bits, first.group_size, first.symmetric) == (4, 32, False)
    assert isinstance(converted.get_submodule("net.3"), torch.nn.Linear)


def test_gptq_convert_without_calibration_is_a_plugin_error() -> None:
    model, _, _ = _mlp_and_data()
    method = GptqMethod(GptqMethod.Config(), BitWidth.parse("w4"))
    with pytest.raises(PluginError, match="not calibrated"):
        method.convert(copy.deepcopy(model))


def test_gptq_layer_without_data_is_a_plugin_error() -> None:
    model, _, _ = _mlp_and_data()
    method = GptqMethod(GptqMethod.Config(), BitWidth.parse("w4"))
    with pytest.raises(PluginError, match="saw no calibration data"):
        method.calibrate(copy.deepcopy(model), lambda _m: None)


def test_a_barely_indefinite_hessian_gets_more_damping() -> None:
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(11)).double()
    hessian = 2 * x.t() @ x - 1e-3 * torch.eye(32, dtype=torch.float64)  # rank 2, minus a bit
    gq = gptq_quantize(torch.randn(8, 32, generator=torch.Generator().manual_seed(12)), hessian, 4)
    assert torch.isfinite(gq.scale).all() and gq.q.shape == (8, 32)


def test_sequential_calibration_stops_each_pass_after_its_layer() -> None:
    """Layer by layer, a calibration pass runs the model only as far as the layer it is
    for: the first layer's pass never reaches the last layer."""
    model, calib, _ = _mlp_and_data()
    candidate = copy.deepcopy(model)
    last = candidate.get_submodule("net.3")
    reached: list[int] = []
    last.register_forward_pre_hook(lambda _m, args: reached.append(args[0].shape[0]))
    method = GptqMethod(GptqMethod.Config(sequential=True), BitWidth.parse("w4"))

    def forward_loop(m: torch.nn.Module) -> None:
        for xb in calib.split(64):
            m(xb)

    method.calibrate(method.prepare(candidate), forward_loop)
    batches = len(calib.split(64))
    assert len(reached) == batches  # only the last layer's own pass reached it


def _calibrated(
    model: torch.nn.Module, calib: torch.Tensor, **options: object
) -> tuple[GptqMethod, torch.nn.Module]:
    method = GptqMethod(GptqMethod.Config.model_validate(options), BitWidth.parse("w4"))

    def forward_loop(m: torch.nn.Module) -> None:
        for xb in calib.split(64):
            m(xb)

    return method, method.calibrate(method.prepare(copy.deepcopy(model)), forward_loop)


@pytest.mark.parametrize("symmetric", [True, False])
def test_an_fp32_layers_integers_are_read_back_from_its_weight_exactly(
    monkeypatch: pytest.MonkeyPatch, symmetric: bool
) -> None:
    """Between calibrate and convert an fp32 layer keeps only its grid: the integers
    convert reads back from the dequantized weight are GPTQ's, every one."""
    import qatbench.methods.gptq as gptq_method

    chosen: list[torch.Tensor] = []

    def recording(*args: object, **kwargs: object) -> object:
        result = gptq_quantize(*args, **kwargs)  # type: ignore[arg-type]
        chosen.append(result.q.clone())
        return result

    monkeypatch.setattr(gptq_method, "gptq_quantize", recording)
    model, calib, _ = _mlp_and_data()
    method, calibrated = _calibrated(model, calib, group_size=32, symmetric=symmetric)
    assert not any(hasattr(kept, "q") for kept in method._results.values())  # grids only
    converted = method.convert(calibrated)
    layers = [converted.get_submodule(n) for n in ("net.1", "net.3")]
    assert all(isinstance(layer, WeightOnlyLinear) for layer in layers)
    for layer, q in zip(layers, chosen, strict=True):
        assert torch.equal(layer.int_weight(), q)


def test_a_layer_changed_between_calibrate_and_convert_is_a_plugin_error() -> None:
    model, calib, _ = _mlp_and_data()
    method, calibrated = _calibrated(model, calib)
    with torch.no_grad():
        calibrated.get_submodule("net.1").weight[0, 0] += 1e-3
    with pytest.raises(PluginError, match=r"'net\.1' changed between calibrate and convert"):
        method.convert(calibrated)
