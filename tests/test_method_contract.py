"""The contract kit over every registered method, and the kit catching broken methods."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel

from qatbench import registry
from qatbench.methods.base import Capabilities, MethodConfig, QuantMethod
from qatbench.methods.contract import check_method


def _registered() -> list[tuple[str, str]]:
    return [
        (name, bits)
        for name in registry.methods.names()
        for bits in registry.methods.get(name).capabilities.allowed_bits()
    ]


@pytest.mark.parametrize(("name", "bits"), _registered(), ids=lambda v: str(v))
def test_registered_method_honours_contract(name: str, bits: str) -> None:
    method = registry.methods.get(name)
    unavailable = getattr(method, "unavailable_reason", None)
    if unavailable is not None and unavailable():
        pytest.skip(f"{name}: {unavailable()}")  # an optional extra that is not installed
    check_method(method, bits)


class _Rtn(QuantMethod):
    """A well-behaved weight-only method, simulated in fp32; the broken ones derive from it."""

    name = "contract_rtn"
    capabilities = Capabilities(weight_bits=frozenset({8}), weight_only=True)

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, torch.nn.Linear):
                    scale = layer.weight.abs().max().clamp(min=1e-12) / 127
                    layer.weight.copy_((layer.weight / scale).round() * scale)
        return model


class _ConvertReturnsNone(_Rtn):
    name = "convert_returns_none"

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        super().convert(model)
        return None  # type: ignore[return-value]  # the contract violation under test


class _LooseConfig(_Rtn):
    name = "loose_config"

    class Config(BaseModel):  # extra keys allowed, not frozen: both break the contract
        level: int = 1


class _NotFrozen(_Rtn):
    name = "not_frozen"

    class Config(MethodConfig, frozen=False):
        level: int = 1


class _CamelName(_Rtn):
    name = "CamelName"


class _ShapeChanger(_Rtn):
    name = "shape_changer"

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.Sequential(model, torch.nn.Linear(10, 3))


class _NanOutputs(_Rtn):
    name = "nan_outputs"

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.bias.fill_(float("nan"))
        return model


class _CalibrateRaises(_Rtn):
    name = "calibrate_raises"
    capabilities = Capabilities(
        weight_bits=frozenset({8}), weight_only=True, needs_calibration=True
    )

    def calibrate(self, model: torch.nn.Module, forward_loop: object) -> torch.nn.Module:
        raise ValueError("no ranges")


class _OrtDisagrees(_Rtn):
    """Torch output differs from the exported graph: export writes the unconverted model."""

    name = "ort_disagrees"

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        return _Offset(model)

    def export(self, model, example_inputs, path):  # type: ignore[no-untyped-def]  # test stub
        return super().export(model.inner, example_inputs, path)


class _ClaimsToKeepWeights(_Rtn):
    """Rounds weights in place but says it never writes into them: fp32 itself changes."""

    name = "claims_to_keep_weights"
    capabilities = Capabilities(weight_bits=frozenset({8}), weight_only=True, keeps_weights=True)


class _Offset(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 100.0


def test_well_behaved_method_passes() -> None:
    check_method(_Rtn)


def test_convert_returning_none_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"convert\(\) returned NoneType"):
        check_method(_ConvertReturnsNone, "w8")


@pytest.mark.parametrize(
    ("cls", "pattern"),
    [
        (_LooseConfig, "reject unknown keys"),
        (_NotFrozen, "frozen"),
        (_CamelName, "snake_case"),
        (_ShapeChanger, "output shape"),
        (_NanOutputs, "non-finite"),
        (_CalibrateRaises, r"calibrate\(\) raised ValueError: no ranges"),
        (_OrtDisagrees, "onnxruntime disagrees"),
        (_ClaimsToKeepWeights, "changed the fp32 model's .*keeps_weights"),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_contract_violations_are_caught(cls: type[QuantMethod], pattern: str) -> None:
    with pytest.raises(AssertionError, match=pattern):
        check_method(cls, "w8")


def test_bits_outside_capabilities_rejected() -> None:
    with pytest.raises(AssertionError, match="allowed_bits"):
        check_method(_Rtn, "w4a8")


def test_check_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_method(registry.methods.get("fp32"))
    assert torch.equal(torch.rand(3), expected)


def test_bits_are_declared_once_in_capabilities() -> None:
    """Every Config with per-layer overrides accepts exactly the declared weight widths."""
    for name in registry.methods.names():
        method = registry.methods.get(name)
        override_bits = getattr(method.Config, "override_bits", None)
        if override_bits is not None:
            assert override_bits == method.capabilities.weight_bits, name
    smoothquant = registry.methods.get("smoothquant")
    with pytest.raises(ValueError, match=r"weight bits must be one of \[4, 8\]"):
        smoothquant.Config.model_validate({"overrides": {"blocks.*": 2}})
