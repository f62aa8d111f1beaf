"""Output error against fp32: whole-model metrics and the per-layer breakdown."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from qatbench.measure.error import accuracy_percent, layer_errors, output_error


def test_output_error_hand_computed() -> None:
    reference = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    actual = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    got = output_error(reference, actual)
    assert set(got) == {"mse", "max_abs_error", "sqnr_db", "cosine"}
    assert got["mse"] == pytest.approx(0.25, rel=1e-12)  # (0 + 0 + 0 + 1) / 4
    assert got["max_abs_error"] == 1.0
    # signal power (1 + 4 + 9 + 16) / 4 = 7.5; 7.5 / 0.25 = 30
    assert got["sqnr_db"] == pytest.approx(10 * math.log10(30), rel=1e-12)
    # <r, a> = 1 + 4 + 9 + 20 = 34; |r|^2 = 30; |a|^2 = 1 + 4 + 9 + 25 = 39
    assert got["cosine"] == pytest.approx(34 / math.sqrt(30 * 39), rel=1e-12)


def test_output_error_sign_flip_and_scale() -> None:
    reference = torch.tensor([1.0, -2.0, 2.0])
    got = output_error(reference, -reference)
    assert got["cosine"] == pytest.approx(-1.0)
    assert got["mse"] == pytest.approx(12.0)  # (2^2 + 4^2 + 4^2) / 3
    assert got["max_abs_error"] == 4.0
    assert got["sqnr_db"] == pytest.approx(10 * math.log10(3 / 12))
    halved = output_error(reference, reference / 2)
    assert halved["cosine"] == pytest.approx(1.0)
    assert halved["sqnr_db"] == pytest.approx(10 * math.log10(4))  # noise = signal / 2


def test_output_error_identical_outputs() -> None:
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    got = output_error(x, x.clone())
    assert got["mse"] == 0.0
    assert got["max_abs_error"] == 0.0
    assert got["sqnr_db"] == 400.0  # capped: a number, not inf
    assert math.isfinite(got["sqnr_db"])
    assert got["cosine"] == pytest.approx(1.0, abs=1e-12)


def test_output_error_values_are_plain_floats() -> None:
    got = output_error(torch.ones(3, dtype=torch.float16), torch.zeros(3))
    assert all(type(v) is float for v in got.values())
    assert got["mse"] == 1.0 and got["max_abs_error"] == 1.0


def test_accuracy_percent() -> None:
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 0, 0, 0])
    assert accuracy_percent(logits, labels) == 75.0


class _Offset(torch.nn.Module):
    """A stand-in for a quantized layer: the float layer plus a fixed error."""

    def __init__(self, linear: torch.nn.Module, offset: float) -> None:
        super().__init__()
        self.linear, self.offset = linear, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offset


def _pair() -> tuple[torch.nn.Sequential, torch.nn.Sequential]:
    torch.manual_seed(0)
    reference = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 3),
    ).eval()
    candidate = copy.deepcopy(reference)
    candidate[0] = _Offset(candidate[0], 0.01)
    candidate[4] = _Offset(candidate[4], 0.5)
    return reference, candidate


def test_layer_errors_finds_replaced_layers_worst_first() -> None:
    reference, candidate = _pair()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    rows = layer_errors(reference, candidate, x)
    assert [r["layer"] for r in rows] == ["4", "0"]  # layer 2 is unchanged: not listed
    assert all(r["type"] == "_Offset" for r in rows)
    assert float(rows[0]["sqnr_db"]) < float(rows[1]["sqnr_db"])
    assert rows[0]["max_abs_error"] == pytest.approx(0.5, rel=1e-5)
    assert rows[1]["max_abs_error"] == pytest.approx(0.01, rel=1e-4)
    assert rows[1]["mse"] == pytest.approx(1e-4, rel=1e-3)


def test_layer_errors_feeds_each_layer_the_fp32_input() -> None:
    """Errors do not compound: layer 4 sees what fp32 layer 4 saw, not layer 0's error."""
    reference, candidate = _pair()
    candidate[0] = _Offset(reference[0], 100.0)  # a huge error upstream
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    rows = {r["layer"]: r for r in layer_errors(reference, candidate, x)}
    assert rows["4"]["max_abs_error"] == pytest.approx(0.5, rel=1e-5)


def test_layer_errors_custom_runner_and_no_replacements() -> None:
    reference, candidate = _pair()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    calls: list[str] = []

    def run(layer: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        calls.append(type(layer).__name__)
        return layer(inputs)

    assert len(layer_errors(reference, candidate, x, run_candidate_layer=run)) == 2
    assert calls == ["_Offset", "_Offset"]
    assert layer_errors(reference, copy.deepcopy(reference), x) == []


def test_layer_errors_restores_the_reference_model() -> None:
    reference, candidate = _pair()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    layer_errors(reference, candidate, x)
    assert all(not m._forward_hooks for m in reference.modules())


def test_layer_errors_on_ptq_mlp() -> None:
    from qatbench.methods.ptq import PtqMethod
    from qatbench.models.mlp import Mlp, MlpConfig
    from qatbench.quant.bitwidth import BitWidth

    torch.manual_seed(0)
    fp32 = Mlp(MlpConfig(hidden=(32, 16))).eval()
    method = PtqMethod(bits=BitWidth.parse("w4a8"))
    calib = torch.randn(16, 28, 28, generator=torch.Generator().manual_seed(3))
    candidate = method.calibrate(method.prepare(copy.deepcopy(fp32)), lambda m: m(calib))
    candidate = method.convert(candidate).eval()
    rows = layer_errors(fp32, candidate, calib)
    assert sorted(r["layer"] for r in rows) == ["net.1", "net.3", "net.5"]
    assert {r["type"] for r in rows} == {"QuantizedLinear"}
    sqnr = [float(r["sqnr_db"]) for r in rows]
    assert sqnr == sorted(sqnr)
    assert all(0 < s < 400 for s in sqnr)
