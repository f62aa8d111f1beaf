"""Simulated quantization: fake-quantized weights and activations, stored and run in fp32.

``prepare`` folds BatchNorm into the convolution before it, then wraps every ``nn.Linear``,
``nn.Conv1d`` and ``nn.Conv2d`` in a :class:`~qatbench.quant.fake_quant.FakeQuantLinear`
(symmetric per-channel weights, asymmetric per-tensor inputs, 8-bit outputs;
``quantize_conv: false`` wraps Linear layers only);
``calibrate`` records activation ranges with the runner's forward loop. ``convert`` keeps
the simulation: the weights stay fp32 and every call quantizes and dequantizes them again,
so the artifact is not smaller and no integer kernel runs, on torch or onnxruntime (the
exported graph is float ``Div``/``Round``/``Clip``/``Mul``). The class attribute
``simulated = True`` says so, for the runner to record; the numbers show what the
quantization grid costs in accuracy, not what a deployment would gain.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from qatbench.errors import PluginError
from qatbench.methods.base import (
    ALL_RUNTIMES,
    COMPILED,
    LINEAR_AND_CONV,
    Capabilities,
    ForwardLoop,
    QuantMethod,
)
from qatbench.methods.layer_selection import LayerSelection, select_layers, select_linears
from qatbench.quant.batchnorm import fold_batchnorm
from qatbench.quant.fake_quant import calibrate_activations, fake_quant_layers, wrap_linears
from qatbench.quant.quantized_conv import convertible

FAKE_WEIGHT_BITS = frozenset({2, 3, 4, 8})
FAKE_ACTIVATION_BITS = frozenset({4, 8})


class FakeQuantConfig(LayerSelection):
    """Options shared by ``fake_quant`` and ``qat`` (with ``keep_fp32`` and ``overrides``)."""

    reduce_range: bool = Field(
        True,
        description="8-bit activations on 7 bits, as the integer kernels of ptq/qat run them",
    )
    quantize_conv: bool = Field(
        True, description="quantize Conv1d/Conv2d (BatchNorm folded first); false: Linear only"
    )
    weight_clip: Literal["absmax", "mse"] = Field(
        "absmax",
        description="per-channel weight range: absmax, or the clipping that minimises MSE",
    )


def convertible_layer(layer: torch.nn.Module) -> bool:
    """Linear layers, and convolutions the integer conv kernels take."""
    return isinstance(layer, torch.nn.Linear) or convertible(layer)


def input_bits(activation_bits: int | None, reduce_range: bool) -> int | None:
    """Bits the input quantizer uses: 8-bit activations on 7 bits under ``reduce_range``."""
    if activation_bits == 8 and reduce_range:
        return 7
    return activation_bits


class FakeQuantMethod(QuantMethod):
    """Fake quantization with the straight-through estimator; honestly not smaller."""

    name = "fake_quant"
    simulated: ClassVar[bool] = True
    capabilities = Capabilities(
        weight_bits=FAKE_WEIGHT_BITS,
        activation_bits=FAKE_ACTIVATION_BITS,
        weight_only=True,
        needs_calibration=True,
        runtimes=ALL_RUNTIMES | COMPILED,
        layer_types=LINEAR_AND_CONV,
    )
    Config = FakeQuantConfig

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        plan = select_linears(model, self.config, self.bits.weight)
        if self.config.quantize_conv:
            # Fold, then fake-quantize the folded conv: what the integer conv will hold. QAT
            # trains the folded weights (BatchNorm frozen into them) rather than simulating
            # the fold on every step; see docs/cnn.md.
            fold_batchnorm(model)
            types = self.capabilities.layer_classes()
            plan = select_layers(model, self.config, self.bits.weight, types)
            plan = {n: b for n, b in plan.items() if convertible_layer(model.get_submodule(n))}
        if not plan:
            raise PluginError(f"{self.name}: no Linear layer left to quantize")
        return wrap_linears(
            model,
            plan,
            input_bits(self.bits.activation, self.config.reduce_range),
            getattr(self.config, "estimator", "ste"),
            weight_clip=self.config.weight_clip,
        )

    def calibrate(self, model: torch.nn.Module, forward_loop: ForwardLoop) -> torch.nn.Module:
        try:
            calibrate_activations(model, forward_loop)
        except ValueError as exc:
            raise PluginError(f"{self.name}: {exc}") from None
        return model

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        if not fake_quant_layers(model):
            raise PluginError(f"{self.name}: the model has no Linear layer to quantize")
        return model.eval()
