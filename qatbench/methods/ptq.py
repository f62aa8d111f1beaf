"""Static post-training quantization: calibrated activations, per-channel integer weights.

``prepare`` folds BatchNorm into the convolution before it, then wraps every ``nn.Linear``,
``nn.Conv1d`` and ``nn.Conv2d`` (grouped and depthwise included) so calibration records the
range of its input and output with the configured observer (``observer: minmax`` by
default; ``moving_average``, ``percentile``, ``mse``, ``kl``, see
:mod:`qatbench.quant.observers`); ``convert`` replaces
each with a :class:`QuantizedLinear` or :class:`QuantizedConv` holding real integers
(4-bit weights packed two per byte) that runs on integer kernels in torch (fbgemm's
quantized GEMM and convolution) and, exported as QDQ, in onnxruntime (``QLinearConv``).
``quantize_conv: false`` keeps convolutions in fp32 (Linear only, as before).
``keep_fp32`` and ``overrides`` (:mod:`.layer_selection`) set per-layer precision, e.g.
``overrides: {"<first>": 8}`` in a ``w4a8`` trial.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from qatbench.errors import PluginError
from qatbench.methods.base import LINEAR_AND_CONV, Capabilities, ForwardLoop, QuantMethod
from qatbench.methods.layer_selection import LayerSelection, select_layers
from qatbench.quant.batchnorm import fold_batchnorm
from qatbench.quant.observers import MinMaxConfig, Observer, ObserverChoice
from qatbench.quant.quantized_conv import QuantizedConv, convertible
from qatbench.quant.quantized_linear import QuantizedLinear


class ObservedLinear(torch.nn.Module):
    """An ``nn.Linear`` that records the ranges of its input and output."""

    def __init__(
        self,
        linear: torch.nn.Linear,
        weight_bits: int = 8,
        input_observer: Observer | None = None,
        output_observer: Observer | None = None,
    ) -> None:
        super().__init__()
        self.linear = linear
        self.weight_bits = weight_bits
        self.input_observer = input_observer or MinMaxConfig().build()
        self.output_observer = output_observer or MinMaxConfig().build()

    @property
    def layer(self) -> torch.nn.Module:
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_observer.observe(x)
        y = self.linear(x)
        self.output_observer.observe(y)
        return y


class ObservedConv(torch.nn.Module):
    """An ``nn.Conv1d``/``nn.Conv2d`` (BatchNorm already folded) recording its ranges."""

    def __init__(
        self,
        conv: torch.nn.Module,
        weight_bits: int,
        input_observer: Observer,
        output_observer: Observer,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.weight_bits = weight_bits
        self.input_observer = input_observer
        self.output_observer = output_observer

    @property
    def layer(self) -> torch.nn.Module:
        return self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_observer.observe(x)
        y = self.conv(x)
        self.output_observer.observe(y)
        return y


class PtqMethod(QuantMethod):
    """Static PTQ with calibrated activation ranges (``w8a8``, ``w4a8``)."""

    name = "ptq"
    # Weights below 4 bits and 4-bit activations run on the same 8-bit integer kernels,
    # fed narrower integers (see QuantizedLinear); w2a8 is where ptq visibly loses accuracy.
    capabilities = Capabilities(
        weight_bits=frozenset({2, 3, 4, 8}),
        activation_bits=frozenset({4, 8}),
        needs_calibration=True,
        layer_types=LINEAR_AND_CONV,
        reusable_model=True,
    )

    class Config(LayerSelection):
        override_bits: ClassVar[frozenset[int]] = frozenset({2, 3, 4, 8})

        skip_layers: list[str] = Field(
            default_factory=list, description="qualified names of layers kept in fp32"
        )
        quantize_conv: bool = Field(
            True, description="quantize Conv1d/Conv2d (BatchNorm folded first); false: Linear only"
        )
        reduce_range: bool = Field(
            True, description="7-bit activations: avoids int16 saturation of x86 u8s8 kernels"
        )
        observer: ObserverChoice = Field(
            default_factory=MinMaxConfig,
            description="activation range: minmax, moving_average, percentile, mse or kl "
            "(or {name: percentile, percentile: 99.9}, ...)",
        )

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        config = self.config
        types: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear,)
        if config.quantize_conv:
            fold_batchnorm(model)
            types = self.capabilities.layer_classes()
        plan = select_layers(model, config, self.bits.weight, types, tuple(config.skip_layers))
        activation_bits = self.bits.activation or 8
        input_bits = activation_bits if activation_bits < 8 else (7 if config.reduce_range else 8)
        for name, bits in plan.items():
            layer = model.get_submodule(name)
            observers = (config.observer.build(input_bits), config.observer.build(8))
            if isinstance(layer, torch.nn.Linear):
                model.set_submodule(name, ObservedLinear(layer, bits, *observers))
            elif convertible(layer):
                model.set_submodule(name, ObservedConv(layer, bits, *observers))
        return model

    def calibrate(self, model: torch.nn.Module, forward_loop: ForwardLoop) -> torch.nn.Module:
        with torch.no_grad():
            forward_loop(model)
        return model

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        observed = [
            (n, m) for n, m in model.named_modules() if isinstance(m, ObservedLinear | ObservedConv)
        ]
        for name, module in observed:
            if not module.input_observer.seen:
                raise PluginError(f"ptq: layer {name!r} saw no calibration data")
            build = (
                QuantizedConv.from_float
                if isinstance(module, ObservedConv)
                else QuantizedLinear.from_float
            )
            quantized = build(
                module.layer,  # type: ignore[arg-type]  # the class matches build
                module.weight_bits,
                module.input_observer.range(),
                module.output_observer.range(),
                reduce_range=self.config.reduce_range,
                activation_bits=self.bits.activation or 8,
            )
            model.set_submodule(name, quantized)
        return model
