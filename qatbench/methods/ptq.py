"""Static post-training quantization: calibrated activations, per-channel integer weights.

``prepare`` wraps every ``nn.Linear`` so calibration records the range of its input and
output with the configured observer (``observer: minmax`` by default; ``moving_average``,
``percentile``, ``mse``, ``kl``, see :mod:`qatbench.quant.observers`); ``convert`` replaces
each with a :class:`QuantizedLinear` holding real integers (4-bit weights packed two per
byte) that runs on integer kernels in torch and, exported as QDQ, in onnxruntime.
``keep_fp32`` and ``overrides`` (:mod:`.layer_selection`) set per-layer precision, e.g.
``overrides: {"<first>": 8}`` in a ``w4a8`` trial.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from qatbench.errors import PluginError
from qatbench.methods.base import Capabilities, ForwardLoop, QuantMethod
from qatbench.methods.layer_selection import LayerSelection, select_linears
from qatbench.quant.observers import MinMaxConfig, Observer, ObserverChoice
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_observer.observe(x)
        y = self.linear(x)
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
    )

    class Config(LayerSelection):
        override_bits: ClassVar[frozenset[int]] = frozenset({2, 3, 4, 8})

        skip_layers: list[str] = Field(
            default_factory=list, description="qualified names of Linear layers kept in fp32"
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
        plan = select_linears(model, config, self.bits.weight, skip=tuple(config.skip_layers))
        activation_bits = self.bits.activation or 8
        input_bits = activation_bits if activation_bits < 8 else (7 if config.reduce_range else 8)
        for name, bits in plan.items():
            linear = model.get_submodule(name)
            assert isinstance(linear, torch.nn.Linear)
            observed = ObservedLinear(
                linear, bits, config.observer.build(input_bits), config.observer.build(8)
            )
            model.set_submodule(name, observed)
        return model

    def calibrate(self, model: torch.nn.Module, forward_loop: ForwardLoop) -> torch.nn.Module:
        with torch.no_grad():
            forward_loop(model)
        return model

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        observed = [(n, m) for n, m in model.named_modules() if isinstance(m, ObservedLinear)]
        for name, module in observed:
            if not module.input_observer.seen:
                raise PluginError(f"ptq: layer {name!r} saw no calibration data")
            quantized = QuantizedLinear.from_float(
                module.linear,
                module.weight_bits,
                module.input_observer.range(),
                module.output_observer.range(),
                reduce_range=self.config.reduce_range,
                activation_bits=self.bits.activation or 8,
            )
            model.set_submodule(name, quantized)
        return model
