"""Dynamic quantization: int8 weights, activations quantized per call from their own range.

No calibration: ``convert`` replaces every ``nn.Linear`` with a
:class:`~qatbench.quant.dynamic_linear.DynamicQuantizedLinear`. torch runs fbgemm's
dynamic integer GEMM on prepacked weights; the exported graph (``DynamicQuantizeLinear`` +
``MatMulInteger``) runs onnxruntime's ``DynamicQuantizeMatMul``. Both compute the same
integers, so their outputs agree to float rounding.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from qatbench.methods.base import Capabilities, QuantMethod
from qatbench.methods.layer_selection import LayerSelection, replace_linears
from qatbench.quant.dynamic_linear import DynamicQuantizedLinear


class DynamicMethod(QuantMethod):
    """Per-channel int8 weights, per-call uint8 activations (``w8a8``)."""

    name = "dynamic"
    capabilities = Capabilities(weight_bits=frozenset({8}), activation_bits=frozenset({8}))

    class Config(LayerSelection):
        override_bits: ClassVar[frozenset[int]] = frozenset({8})

        reduce_range: bool = Field(
            True,
            description="7-bit weights: x86 u8s8 kernels without VNNI saturate int16 sums "
            "with 8-bit weights and 8-bit activations",
        )

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        reduce_range = self.config.reduce_range
        return replace_linears(
            model,
            self.config,
            self.bits.weight,
            self.name,
            lambda linear: DynamicQuantizedLinear.from_float(linear, reduce_range),
        )
