"""Static post-training quantization: calibrated activations, per-channel integer weights.

``prepare`` wraps every ``nn.Linear`` so calibration records the range of its input and
output (min-max); ``convert`` replaces each with a :class:`QuantizedLinear` holding real
integers (4-bit weights packed two per byte) that runs on integer kernels in torch and,
exported as QDQ, in onnxruntime.
"""

from __future__ import annotations

import torch
from pydantic import Field

from qatbench.errors import PluginError
from qatbench.methods.base import Capabilities, ForwardLoop, MethodConfig, QuantMethod
from qatbench.quant.observers import MinMaxObserver
from qatbench.quant.quantized_linear import QuantizedLinear


class ObservedLinear(torch.nn.Module):
    """An ``nn.Linear`` that records the ranges of its input and output."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.input_observer = MinMaxObserver()
        self.output_observer = MinMaxObserver()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_observer.observe(x)
        y = self.linear(x)
        self.output_observer.observe(y)
        return y


class PtqMethod(QuantMethod):
    """Static PTQ with min-max calibration (``w8a8``, ``w4a8``)."""

    name = "ptq"
    capabilities = Capabilities(
        weight_bits=frozenset({4, 8}),
        activation_bits=frozenset({8}),
        needs_calibration=True,
    )

    class Config(MethodConfig):
        skip_layers: list[str] = Field(
            default_factory=list, description="qualified names of Linear layers kept in fp32"
        )
        reduce_range: bool = Field(
            True, description="7-bit activations: avoids int16 saturation of x86 u8s8 kernels"
        )

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        targets = [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in self.config.skip_layers
        ]
        for name in targets:
            linear = model.get_submodule(name)
            assert isinstance(linear, torch.nn.Linear)
            model.set_submodule(name, ObservedLinear(linear))
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
                self.bits.weight,
                (module.input_observer.min_val, module.input_observer.max_val),
                (module.output_observer.min_val, module.output_observer.max_val),
                reduce_range=self.config.reduce_range,
            )
            model.set_submodule(name, quantized)
        return model
