"""Affine quantization: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``.

Rounding is half-to-even, as in ``torch.round`` and ONNX ``QuantizeLinear``, so a model
quantized here and its exported graph agree bit for bit.
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """The integer range of a ``bits``-wide integer, two's complement when ``signed``."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale mapping ``[-absmax, absmax]`` onto ``[-(2^(b-1)-1), 2^(b-1)-1]`` (zero point 0)."""
    qmax = 2 ** (bits - 1) - 1
    return (absmax.float() / qmax).clamp(min=EPS)


def asymmetric_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned scale and zero point covering ``[lo, hi]`` (always including 0)."""
    qmin, qmax = int_range(bits, signed=False)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int64)
    return scale, zero_point


def _broadcast(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Integers (as int32) of ``x``; ``axis`` is the channel axis of per-channel params."""
    zp = torch.as_tensor(zero_point)
    q = torch.round(x / _broadcast(scale, x, axis)) + _broadcast(zp, x, axis)
    return q.clamp(qmin, qmax).to(torch.int32)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, axis: int | None = None
) -> torch.Tensor:
    zp = torch.as_tensor(zero_point)
    return (q.float() - _broadcast(zp, q, axis)) * _broadcast(scale, q, axis)


def quantize_weight_per_channel(
    weight: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel weights: (int8 tensor holding ``bits``-bit values, scales)."""
    absmax = weight.detach().abs().amax(dim=tuple(range(1, weight.dim())))
    scale = symmetric_scale(absmax, bits)
    qmax = 2 ** (bits - 1) - 1
    q = quantize(weight.detach(), scale, 0, -qmax, qmax, axis=0)
    return q.to(torch.int8), scale
