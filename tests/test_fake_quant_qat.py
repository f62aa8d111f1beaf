"""Fake quantization (STE, LSQ), the simulated ``fake_quant`` method and ``qat``."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qatbench.data.datasets import TaskData
from qatbench.data.training import forward_loop, train_loop
from qatbench.errors import PluginError
from qatbench.measure.error import accuracy_percent
from qatbench.measure.size import save_torch_artifact
from qatbench.methods.base import QuantMethod
from qatbench.methods.fake_quant import FakeQuantMethod
from qatbench.methods.ptq import PtqMethod
from qatbench.methods.qat import QatMethod
from qatbench.models.mlp import Mlp, MlpConfig
from qatbench.quant.bitwidth import BitWidth
from qatbench.quant.fake_quant import (
    FakeQuantLinear,
    lsq_fake_quantize,
    mse_weight_scale,
    ste_fake_quantize,
)
from qatbench.quant.quantized_linear import QuantizedLinear
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.runtimes.onnx_export import export_onnx


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Training tiny models is fastest on one thread (and does not fight other tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- estimators ----------------------------------------------------------------------


def test_ste_gradient_passes_inside_the_range_and_is_zero_outside() -> None:
    scale, zp = torch.tensor(0.1), torch.tensor(0)
    # integers -8..7 (4-bit signed): x / scale rounds into the range for x in [-0.85, 0.75)
    x = torch.tensor([-2.0, -0.86, -0.84, -0.33, 0.0, 0.26, 0.74, 0.76, 3.0], requires_grad=True)
    y = ste_fake_quantize(x, scale, zp, -8, 7)
    y.backward(torch.arange(1.0, 10.0))
    assert x.grad is not None
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(x.grad, torch.where(inside, torch.arange(1.0, 10.0), torch.zeros(9)))
    expected = torch.tensor([-0.8, -0.8, -0.8, -0.3, 0, 0.3, 0.7, 0.7, 0.7])
    assert torch.allclose(y.detach(), expected)


def test_ste_per_channel_matches_the_plain_forward() -> None:
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scale = w.detach().abs().amax(dim=1) / 7
    zp = torch.zeros(4, dtype=torch.int32)
    y = ste_fake_quantize(w, scale, zp, -7, 7, 0)
    with torch.no_grad():
        plain = ste_fake_quantize(w, scale, zp, -7, 7, 0)
    assert torch.equal(y.detach(), plain)
    y.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.ones_like(w))


def test_lsq_scale_receives_gradient_and_clamped_inputs_do_not() -> None:
    scale = torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([-3.0, -0.24, 0.06, 0.33, 3.0], requires_grad=True)
    y = lsq_fake_quantize(x, scale, torch.tensor(0), -8, 7)
    y.sum().backward()
    assert scale.grad is not None and float(scale.grad) != 0.0
    assert x.grad is not None
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # LSQ's step gradient, damped by 1/sqrt(numel * qmax): clamped values give qmin and qmax,
    # inside ones round(v) - v
    v = torch.tensor([-0.24, 0.06, 0.33]) / torch.tensor(0.1)
    expected = (-8 + 7 + float((v.round() - v).sum())) / (5 * 7) ** 0.5
    assert float(scale.grad) == pytest.approx(expected, rel=1e-4)


def test_mse_scale_clips_outliers_at_low_bits() -> None:
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    w[:, 0] = 4.0  # one outlier per row: ternary levels at +-4 would zero everything else
    absmax_scale = w.abs().amax(dim=1) / 1
    assert bool((mse_weight_scale(w, 2) < absmax_scale).all())
    assert torch.allclose(mse_weight_scale(w, 8), w.abs().amax(dim=1) / 127)


# ---- methods on a tiny task ----------------------------------------------------------


def _task(seed: int = 0) -> TaskData:
    """Eight overlapping Gaussian classes in 16 dimensions."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(8, 16, generator=gen) * 0.9
    y = torch.randint(0, 8, (1200,), generator=gen)
    x = centers[y] + torch.randn(1200, 16, generator=gen)
    return TaskData("tiny", x[:800], y[:800], x[:200], x[800:], y[800:], 8)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, TaskData]:
    data = _task()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Mlp(MlpConfig(in_features=16, hidden=(32,), num_classes=8))
    train_loop(data, 32, 0)(model, torch.optim.Adam(model.parameters(), lr=1e-2), 150)
    return model.eval(), data


def _accuracy(model: torch.nn.Module, data: TaskData) -> float:
    assert data.eval_y is not None
    with torch.inference_mode():
        return accuracy_percent(model(data.eval_x), data.eval_y)


def _run(method: QuantMethod, model: torch.nn.Module, data: TaskData) -> torch.nn.Module:
    m = method.prepare(copy.deepcopy(model))
    m = method.calibrate(m, forward_loop(data, 32))
    if method.capabilities.needs_training:
        m = method.train(m, train_loop(data, 32, 0))
    return method.convert(m).eval()


@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_qat_recovers_at_least_half_of_ptq_loss_at_w2a8(
    tiny: tuple[torch.nn.Module, TaskData], estimator: str
) -> None:
    model, data = tiny
    bits = BitWidth.parse("w2a8")
    fp32 = _accuracy(model, data)
    ptq = _accuracy(_run(PtqMethod(PtqMethod.Config(), bits), model, data), data)
    cfg = QatMethod.Config(estimator=estimator, steps=100, lr=1e-2)
    qat_model = _run(QatMethod(cfg, bits), model, data)
    assert all(not isinstance(m, torch.nn.Linear | FakeQuantLinear) for m in qat_model.modules()), (
        "qat must convert every layer to integers"
    )
    assert sum(isinstance(m, QuantizedLinear) for m in qat_model.modules()) == 2
    qat = _accuracy(qat_model, data)
    assert fp32 - ptq >= 3, f"the tiny task should punish ptq at w2a8: {fp32} vs {ptq}"
    assert qat - ptq >= 0.5 * (fp32 - ptq), f"fp32 {fp32}, ptq {ptq}, qat {qat}"


@pytest.mark.parametrize("bits", ["w4a8", "w2a4"])
@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_qat_integer_model_computes_what_training_simulated(
    tiny: tuple[torch.nn.Module, TaskData], bits: str, estimator: str
) -> None:
    model, data = tiny
    cfg = QatMethod.Config(estimator=estimator, steps=20, lr=1e-3)
    method = QatMethod(cfg, BitWidth.parse(bits))
    m = method.train(
        method.calibrate(method.prepare(copy.deepcopy(model)), forward_loop(data, 32)),
        train_loop(data, 32, 0),
    )
    with torch.inference_mode():
        simulated = m(data.eval_x)
    converted = method.convert(m)
    with torch.inference_mode():
        integer = converted(data.eval_x)
    # one output quantization step of the last layer, for float rounding at a boundary
    last = [q for q in converted.modules() if isinstance(q, QuantizedLinear)][-1]
    step = float(last.output_scale)
    assert float((simulated - integer).abs().max()) <= step + 1e-5
    assert (simulated.argmax(1) == integer.argmax(1)).float().mean() > 0.99


def test_lsq_training_moves_the_scales(tiny: tuple[torch.nn.Module, TaskData]) -> None:
    model, data = tiny
    cfg = QatMethod.Config(estimator="lsq", steps=30, lr=1e-2)
    method = QatMethod(cfg, BitWidth.parse("w4a4"))
    m = method.calibrate(method.prepare(copy.deepcopy(model)), forward_loop(data, 32))
    layer = next(x for x in m.modules() if isinstance(x, FakeQuantLinear))
    assert layer.input_quant is not None
    with torch.no_grad():
        m(data.calib_x[:4])  # initialises the weight scale
    before = (layer.weight_quant.scale.detach().clone(), layer.input_quant.scale.detach().clone())
    method.train(m, train_loop(data, 32, 0))
    assert not torch.equal(before[0], layer.weight_quant.scale.detach())
    assert not torch.equal(before[1], layer.input_quant.scale.detach())


def test_qat_epochs_need_a_loop_that_knows_its_epoch(
    tiny: tuple[torch.nn.Module, TaskData],
) -> None:
    model, data = tiny
    cfg = QatMethod.Config(epochs=0.5)
    method = QatMethod(cfg, BitWidth.parse("w8a8"))
    m = method.calibrate(method.prepare(copy.deepcopy(model)), forward_loop(data, 32))
    with pytest.raises(PluginError, match="steps_per_epoch"):  # a loop that does not say
        method.train(m, lambda model, optimizer, steps: None)
    assert train_loop(data, 32, 0).steps_per_epoch == -(-len(data.train_x) // 32)  # runner's
    seen: list[int] = []

    def loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        seen.append(steps)

    loop.steps_per_epoch = 25  # type: ignore[attr-defined]  # what a runner loop may say
    method.train(m, loop)
    assert seen == [13]


def test_qat_options_are_validated() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        QatMethod.Config.model_validate({"optimizer": "lion"})
    with pytest.raises(ValueError, match="estimator"):
        QatMethod.Config.model_validate({"estimator": "pact"})
    with pytest.raises(ValueError, match="steps"):
        QatMethod.Config.model_validate({"steps": 0})
    cfg = QatMethod.Config.model_validate({"optimizer": "sgd", "lr": 0.05, "steps": 7})
    method = QatMethod(cfg, BitWidth.parse("w8a8"))
    model = FakeQuantLinear(torch.nn.Linear(4, 2), 8, 7)
    assert isinstance(method._optimizer(model), torch.optim.SGD)


def test_fake_quant_is_simulated_not_smaller_and_runs_float_in_onnx(
    tiny: tuple[torch.nn.Module, TaskData], tmp_path: Path
) -> None:
    model, data = tiny
    method = FakeQuantMethod(FakeQuantMethod.Config(), BitWidth.parse("w4a8"))
    fq = _run(method, model, data)
    assert FakeQuantMethod.simulated is True and QatMethod.simulated is False
    fp32_bytes = save_torch_artifact(model, tmp_path / "fp32" / "model.pt")
    fq_bytes = save_torch_artifact(fq, tmp_path / "fq" / "model.pt")
    assert fq_bytes >= fp32_bytes  # fp32 weights plus quantizer state: honestly not smaller
    path = export_onnx(fq, (data.eval_x[:1],), tmp_path / "fq.onnx")
    integer, floating = ortrt.kernel_counts(path, 1)
    assert integer == 0 and floating > 0
    run = ortrt.as_callable(ortrt.make_session(path, 1))
    with torch.inference_mode():
        torch_out = fq(data.eval_x)
    assert float((run(data.eval_x) - torch_out).abs().max()) < 1e-4


def test_fake_quant_weight_only_and_mixed_precision(
    tiny: tuple[torch.nn.Module, TaskData],
) -> None:
    model, data = tiny
    cfg = FakeQuantMethod.Config(keep_fp32=["<last>"], overrides={"<first>": 8})
    fq = _run(FakeQuantMethod(cfg, BitWidth.parse("w2")), model, data)
    layers = [m for m in fq.modules() if isinstance(m, FakeQuantLinear)]
    assert len(layers) == 1 and layers[0].weight_bits == 8 and layers[0].input_quant is None
    assert isinstance(fq.get_submodule("net.3"), torch.nn.Linear)


def test_fake_quant_without_calibration_fails_clearly(
    tiny: tuple[torch.nn.Module, TaskData],
) -> None:
    model, _ = tiny
    method = FakeQuantMethod(FakeQuantMethod.Config(), BitWidth.parse("w8a8"))
    with pytest.raises(PluginError, match="saw no data"):
        method.calibrate(method.prepare(copy.deepcopy(model)), lambda _model: None)
