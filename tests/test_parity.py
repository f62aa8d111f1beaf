"""The ONNX parity tolerance: output quantization steps where the model's output comes
from a static integer layer, a relative tolerance otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qatbench import registry
from qatbench.methods.base import Capabilities, QuantMethod
from qatbench.runtimes import parity
from qatbench.runtimes.onnx_export import export_onnx
from qatbench.spec.schema import validate_experiment
from qatbench.trial.lifecycle import run_trial


class _Requantizing(torch.nn.Module):
    """Stands in for a static int8 layer: rounds its output onto a grid of ``step``."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.register_buffer("output_scale", torch.tensor(step))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x / self.output_scale) * self.output_scale


def test_output_step_is_the_scale_of_the_layer_that_returns_the_output() -> None:
    model = torch.nn.Sequential(_Requantizing(0.5), torch.nn.ReLU(), _Requantizing(0.25))
    assert parity.output_step(model, torch.randn(4, 3)) == 0.25
    assert parity.requantizing_layers(model) == 2


def test_no_output_step_when_something_follows_the_integer_layer() -> None:
    model = torch.nn.Sequential(_Requantizing(0.5), torch.nn.Tanh())
    assert parity.output_step(model, torch.randn(4, 3)) is None
    assert parity.output_step(torch.nn.Linear(3, 2), torch.randn(4, 3)) is None


def test_one_step_per_requantizing_layer() -> None:
    reference = torch.tensor([[1.0, -2.0, 0.5]])
    one_step_off = reference + torch.tensor([[0.25, 0.0, 0.0]])
    assert parity.compare(reference, one_step_off, 0.25).ok
    two_steps_off = reference + torch.tensor([[0.5, 0.0, 0.0]])
    assert not parity.compare(reference, two_steps_off, 0.25, steps=1).ok
    result = parity.compare(reference, two_steps_off, 0.25, steps=2)
    assert result.ok and result.basis == "output_step" and result.steps == 2


def test_relative_tolerance_is_two_percent_of_the_largest_output() -> None:
    reference = torch.tensor([[10.0, -50.0, 3.0]])
    assert parity.compare(reference, reference + 0.99, None).ok  # 1.0 allowed
    result = parity.compare(reference, reference + 1.01, None)
    assert not result.ok and result.basis == "relative"
    assert result.tolerance == 1.0 and result.max_abs > 1.0


class _OffByHalf(QuantMethod):
    """A broken exporter: the graph it writes computes 1.5 times the torch model."""

    name = "off_by_half_export"
    capabilities = Capabilities(weight_bits=frozenset({8}), weight_only=True)

    def export(
        self, model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path
    ) -> Path:
        return export_onnx(torch.nn.Sequential(model, _Scale(1.5)), example_inputs, path)


class _Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@pytest.fixture
def off_by_half() -> Iterator[None]:
    registry.methods.register(_OffByHalf.name, _OffByHalf)
    yield
    registry.methods.unregister(_OffByHalf.name)


def test_a_broken_export_is_flagged_with_a_warning(off_by_half: None, tmp_path: Path) -> None:
    spec = validate_experiment(
        {
            "name": "parity",
            "models": [{"name": "linear", "options": {"in_features": 32, "out_features": 8}}],
            "methods": [{"name": _OffByHalf.name, "bits": ["w8"]}],
            "runtimes": ["onnxruntime"],
            "data": {"dataset": "synthetic", "eval_samples": 16, "calibration_samples": 16},
            "measure": {"batch_sizes": [1], "max_time_s": 0.01, "min_rounds": 3, "warmup_s": 0},
        },
        source="t",
    )
    (trial,) = spec.expand()
    threads = torch.get_num_threads()
    try:
        result = run_trial(trial, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert result.status == "finished"  # a flag, not a failure
    assert result.metrics["onnx_parity_ok"] == 0.0
    assert result.metrics["onnx_parity_max_abs"] > result.metrics["onnx_parity_tolerance"]
    (warning,) = [w for w in result.details["warnings"] if w.startswith("ONNX parity")]
    assert "more than the tolerance" in warning and "relative" in warning


def test_the_tolerance_is_never_tighter_than_the_quantization_error() -> None:
    # all-MiniLM-L6-v2's dynamic int8 (runtimes/parity.py): the runtimes differ by 0.105,
    # each is 0.175 from fp32 with the same SQNR; 2% of the largest output allows 0.0215
    reference = torch.tensor([[1.07, -0.5, 0.2]])
    ort = reference + torch.tensor([[0.0, 0.105, 0.0]])
    assert not parity.compare(reference, ort, None).ok
    result = parity.compare(reference, ort, None, quantization_error=0.175)
    assert result.ok and result.basis == "quantization_error" and result.tolerance == 0.175
    # a wrong export lands beyond the quantization's own error
    broken = parity.compare(reference, reference * 1.5, None, quantization_error=0.175)
    assert not broken.ok and broken.max_abs > 0.5
    # a smaller quantization error leaves the relative tolerance as it was
    assert parity.compare(reference, ort, None, quantization_error=1e-3).basis == "relative"


def test_layers_that_round_activations_as_they_run_are_counted() -> None:
    from qatbench.quant.dynamic_linear import DynamicQuantizedLinear

    dynamic = DynamicQuantizedLinear.from_float(torch.nn.Linear(4, 4))
    model = torch.nn.Sequential(dynamic, torch.nn.ReLU(), _Requantizing(0.5), torch.nn.Linear(4, 2))
    assert parity.activation_quantizing_layers(model) == 2
    assert parity.activation_quantizing_layers(torch.nn.Linear(4, 2)) == 0


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 128)])
def test_weight_only_parity_reference_is_the_fp32_computation(
    bits: int, group_size: int | None
) -> None:
    """torch's int8/int4 kernels round activations to bfloat16; an ONNX graph is compared
    with the fp32 product of the same integers, and the kernel is back afterwards."""
    from qatbench.quant.weight_only_linear import WeightOnlyLinear, fp32_kernels

    torch.manual_seed(0)
    layer = WeightOnlyLinear.from_float(torch.nn.Linear(256, 64), bits, group_size)
    model = torch.nn.Sequential(layer)
    x = torch.randn(4, 256) * 3
    kernel = layer.torch_kernel
    assert kernel != "dequantize"  # the fast path exists on this build
    exact = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    with torch.inference_mode():
        fast = model(x)
        with fp32_kernels(model):
            reference = model(x)
    assert torch.allclose(reference, exact, atol=1e-5)
    assert not torch.allclose(fast, exact, atol=1e-5)  # bfloat16 activations
    assert layer.torch_kernel == kernel


def test_relative_tolerance_grows_with_the_layers_whose_inputs_are_quantized() -> None:
    reference = torch.tensor([[10.0, -50.0, 3.0]])
    assert not parity.compare(reference, reference + 2.5, None).ok
    nine = parity.compare(reference, reference + 2.5, None, quantizing_inputs=9)
    assert nine.ok and nine.tolerance == pytest.approx(9.0)
    assert not parity.compare(reference, reference * 1.5, None, quantizing_inputs=9).ok


def test_weight_only_layers_are_counted() -> None:
    from qatbench.quant.weight_only_linear import WeightOnlyLinear

    model = torch.nn.Sequential(
        WeightOnlyLinear.from_float(torch.nn.Linear(64, 64), 4, 32),
        torch.nn.ReLU(),
        WeightOnlyLinear.from_float(torch.nn.Linear(64, 8), 8),
        torch.nn.Linear(8, 2),
    )
    assert parity.weight_only_layers(model) == 2
