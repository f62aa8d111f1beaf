"""A Linear layer that stores int8 weights and dequantizes them on every call.

What a quantization benchmark gets when nothing runs integer kernels: the artifact is
small (one byte per weight plus a scale per output channel), but every forward converts
the int8 weight back to fp32 (``q * scale``) and multiplies in fp32, so each call pays the
fp32 GEMM plus a pass over the whole weight. It is the reference that shows why real
kernels matter, and it is honest about it: the method that builds it is ``simulated``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from qatbench.quant.affine import quantize_weight_per_channel


class NaiveInt8Linear(torch.nn.Module):
    """Symmetric per-output-channel int8 weights, dequantized to fp32 per call."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear) -> NaiveInt8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight_q, layer.weight_scale = quantize_weight_per_channel(linear.weight, 8)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    @property
    def dequantizes_per_call(self) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_q.float() * self.weight_scale[:, None]  # every call, on purpose
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 dequantized per call"
