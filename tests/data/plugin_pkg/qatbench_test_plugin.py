"""A third-party method, as a plugin author would write it: weight-only round-to-nearest.

Every ``nn.Linear`` weight is rounded to ``bits.weight`` bits with one scale per tensor,
simulated in fp32. ``shrink`` multiplies the scale (1.0 is plain round-to-nearest).
"""

from __future__ import annotations

import torch
from pydantic import Field

from qatbench.methods.base import Capabilities, MethodConfig, QuantMethod


class HalveMethod(QuantMethod):
    """Per-tensor round-to-nearest of Linear weights at 4 or 8 bits."""

    name = "halve"
    capabilities = Capabilities(weight_bits=frozenset({4, 8}), weight_only=True)

    class Config(MethodConfig):
        shrink: float = Field(1.0, gt=0, le=1, description="factor applied to the scale")

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        qmax = 2 ** (self.bits.weight - 1) - 1
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, torch.nn.Linear):
                    scale = layer.weight.abs().max().clamp(min=1e-12) / qmax * self.config.shrink
                    layer.weight.copy_((layer.weight / scale).round().clamp(-qmax, qmax) * scale)
        return model
