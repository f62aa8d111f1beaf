"""Convolutional networks: the CNN zoo, BatchNorm folding, integer convolutions, ptq on a
CNN, the quantized share of the weights and the contract kit on a CNN."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch

from qatbench import registry
from qatbench.errors import ConfigError
from qatbench.measure.size import quantized_weight_fraction
from qatbench.methods.base import Capabilities, QuantMethod
from qatbench.methods.contract import check_method
from qatbench.methods.ptq import PtqMethod
from qatbench.models.cnn import build_mobilenet_v3_small, build_resnet18, build_resnet_tiny
from qatbench.quant.batchnorm import fold_batchnorm
from qatbench.quant.bitwidth import BitWidth
from qatbench.quant.quantized_conv import QuantizedConv
from qatbench.report.flags import partial_flag
from qatbench.results import TrialResult
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.runtimes.onnx_export import export_onnx


def _randomize_bn(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)  # type: ignore[union-attr]
                bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)  # type: ignore[union-attr]
                bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.bias.copy_(torch.rand(n, generator=gen) - 0.5)


def _ptq(model: torch.nn.Module, x: torch.Tensor, bits: str = "w8a8", **options: object):
    method = PtqMethod(PtqMethod.Config(**options), BitWidth.parse(bits))
    candidate = method.prepare(copy.deepcopy(model))
    candidate = method.calibrate(candidate, lambda m: m(x))
    return method, method.convert(candidate).eval()


# ---- the zoo ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "shape"),
    [
        ("resnet_tiny", {}, (1, 28, 28)),
        ("resnet18", {"image_size": 64}, (3, 64, 64)),
        ("mobilenet_v3_small", {"image_size": 64}, (3, 64, 64)),
    ],
)
def test_zoo_cnns_are_registered_and_carry_signal(name, options, shape) -> None:
    model, (example,) = registry.models.get(name)(**options)
    model.eval()
    assert tuple(example.shape[1:]) == shape
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    assert out.shape[0] == 4
    # randomly initialised CNNs in eval mode otherwise shrink their outputs towards zero
    assert float(out.std()) > 1e-3
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules()) or (
        name == "resnet18"
    )


def test_weights_load_from_a_local_file(tmp_path: Path) -> None:
    source, (example,) = build_mobilenet_v3_small(image_size=32, seed=3)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    loaded, _ = build_mobilenet_v3_small(image_size=32, seed=7, weights=str(path))
    x = torch.randn(2, *example.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source.eval()(x))
    with pytest.raises(ConfigError, match="does not exist"):
        build_resnet18(weights=str(tmp_path / "missing.pt"))


def test_torchvision_state_dict_names_match_where_torchvision_imports() -> None:
    models = pytest.importorskip("torchvision.models", exc_type=ImportError)
    ours, _ = build_resnet18(bn_calibration_samples=0)
    theirs = models.resnet18()
    assert ours.state_dict().keys() == theirs.state_dict().keys()


# ---- BatchNorm folding -----------------------------------------------------------------


def test_fold_batchnorm_keeps_outputs_and_removes_every_batchnorm() -> None:
    model, (example,) = build_resnet_tiny()
    _randomize_bn(model)
    model.eval()
    x = torch.randn(8, *example.shape[1:])
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(model)
        after = model(x)
    assert folded == 9
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


class _Untraceable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.body(x)
        return self.body(-x)


def test_fold_batchnorm_falls_back_to_sequential_neighbours() -> None:
    model = _Untraceable()
    _randomize_bn(model)
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        assert fold_batchnorm(model) == 1
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


# ---- integer convolutions --------------------------------------------------------------

CONVS = {
    "conv2d": lambda: torch.nn.Conv2d(8, 16, 3, 2, 1),
    "grouped": lambda: torch.nn.Conv2d(8, 16, 3, 1, 1, groups=4),
    "depthwise": lambda: torch.nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False),
    "conv1d": lambda: torch.nn.Conv1d(4, 8, 5, padding=2),
}


@pytest.mark.parametrize("kind", sorted(CONVS))
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_conv_runs_fbgemm_and_exports_qlinearconv(
    kind: str, bits: int, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    conv = CONVS[kind]().eval()
    spatial = (10,) if isinstance(conv, torch.nn.Conv1d) else (10, 10)
    x = torch.randn(3, conv.in_channels, *spatial)
    with torch.no_grad():
        y = conv(x)
        q = QuantizedConv.from_float(conv, bits, (x.min(), x.max()), (y.min(), y.max()))
        got = q(x)
    scale = float(y.abs().max())
    assert float((got - y).abs().max()) < (0.05 if bits == 8 else 0.2) * scale
    assert q.weight_q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    path = export_onnx(q, (x[:1],), tmp_path / "conv.onnx")
    run = ortrt.as_callable(ortrt.make_session(path, 1))
    assert float((run(x) - got).abs().max()) < 0.05 * scale
    integer, floating = ortrt.kernel_counts(path, 1)
    if isinstance(conv, torch.nn.Conv2d):  # onnxruntime fuses 2-d QDQ convs to QLinearConv
        assert (integer, floating) == (1, 0)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


# ---- ptq on a CNN ----------------------------------------------------------------------


def test_ptq_quantizes_every_conv_of_a_cnn_and_its_graph_is_integer(tmp_path: Path) -> None:
    model, (example,) = build_resnet_tiny()
    _randomize_bn(model)
    model.eval()
    x = torch.randn(16, *example.shape[1:])
    method, converted = _ptq(model, x)
    kinds = {type(m) for m in converted.modules()}
    assert torch.nn.Conv2d not in kinds and torch.nn.BatchNorm2d not in kinds
    assert sum(isinstance(m, QuantizedConv) for m in converted.modules()) == 9
    assert quantized_weight_fraction(model, converted) == 1.0
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(converted(x).flatten(), model(x).flatten(), 0)
    assert float(cos) > 0.99
    path = method.export(converted, (example,), tmp_path / "model.onnx")
    integer, floating = ortrt.kernel_counts(path, 1)
    assert integer / (integer + floating) > 0.8


def test_ptq_quantize_conv_false_keeps_convs_and_is_flagged_partial() -> None:
    model, (example,) = build_resnet_tiny()
    model.eval()
    x = torch.randn(8, *example.shape[1:])
    _, converted = _ptq(model, x, quantize_conv=False)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in converted.modules()) == 9
    fraction = quantized_weight_fraction(model, converted)
    assert 0 < fraction < 0.05  # the classifier only
    trial = TrialResult(
        id="t",
        model="resnet_tiny",
        method="ptq",
        bits="w8a8",
        runtime="torch",
        status="finished",
        metrics={"quantized_weight_fraction": fraction},
    )
    flag = partial_flag(trial)
    assert flag is not None and flag.key == "partial"
    trial.metrics["quantized_weight_fraction"] = 1.0
    assert partial_flag(trial) is None


# ---- the contract kit on a CNN ---------------------------------------------------------


def _first_bits() -> list[tuple[str, str]]:
    return [
        (name, registry.methods.get(name).capabilities.allowed_bits()[0])
        for name in registry.methods.names()
    ]


@pytest.mark.parametrize(("name", "bits"), _first_bits(), ids=lambda v: str(v))
def test_registered_method_honours_contract_on_a_cnn(name: str, bits: str) -> None:
    method = registry.methods.get(name)
    unavailable = getattr(method, "unavailable_reason", None)
    if unavailable is not None and unavailable():
        pytest.skip(f"{name}: {unavailable()}")
    check_method(method, bits, model="cnn")


class _ConvToucher(QuantMethod):
    """Declares Linear only, yet rounds convolution weights: the kit must catch it."""

    name = "conv_toucher"
    capabilities = Capabilities(weight_bits=frozenset({8}), weight_only=True)

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, torch.nn.Conv2d):
                    layer.weight.copy_(layer.weight.round())
        return model


def test_contract_catches_a_linear_only_method_that_changes_convs() -> None:
    with pytest.raises(AssertionError, match="names no Conv2d, but Conv2d"):
        check_method(_ConvToucher, "w8", model="cnn")


def test_ort_static_quantizes_conv_by_default_when_the_graph_holds_conv(tmp_path: Path) -> None:
    method_cls = registry.methods.get("ort_static")
    model, (example,) = build_resnet_tiny()
    model.eval()
    x = torch.randn(8, *example.shape[1:])
    method = method_cls(method_cls.Config(), BitWidth.parse("w8a8"))
    method.calibrate(model, lambda m: m(x))
    path = method.export(model, (example,), tmp_path / "model.onnx")
    integer, floating = ortrt.kernel_counts(path, 1)
    assert floating == 0 and integer >= 9  # every conv (and the classifier) runs integer
    only_matmul = method_cls(method_cls.Config(op_types=["MatMul"]), BitWidth.parse("w8a8"))
    only_matmul.calibrate(model, lambda m: m(x))
    path = only_matmul.export(model, (example,), tmp_path / "matmul.onnx")
    assert ortrt.kernel_counts(path, 1)[1] >= 9  # asked for MatMul only: convs stay float


def test_qat_trains_folded_convs_and_converts_them_to_integer_convs() -> None:
    from qatbench.data.datasets import TaskData
    from qatbench.data.training import train_loop

    model, (example,) = build_resnet_tiny(width=4)
    _randomize_bn(model)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, *example.shape[1:], generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    data = TaskData("t", x, y, x[:16], x[:8], y[:8], 10)
    method_cls = registry.methods.get("qat")
    method = method_cls(method_cls.Config(steps=3), BitWidth.parse("w4a8"))
    candidate = method.prepare(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in candidate.modules())
    candidate = method.calibrate(candidate, lambda m: m(x[:16]))
    stem_before = candidate.get_submodule("stem.0").linear.weight.detach().clone()
    candidate = method.train(candidate, train_loop(data, 8, 0))
    assert not torch.equal(candidate.get_submodule("stem.0").linear.weight, stem_before)
    converted = method.convert(candidate).eval()
    assert sum(isinstance(m, QuantizedConv) for m in converted.modules()) == 9
    assert quantized_weight_fraction(model, converted) == 1.0
    assert converted.get_submodule("stem.0").weight_bits == 4
