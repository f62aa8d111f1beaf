"""Affine quantization: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``.

Rounding is half-to-even, as in ``torch.round`` and ONNX ``QuantizeLinear``, so a model
quantized here and its exported graph agree bit for bit.

Granularity: per tensor (``axis=None``), per channel (one scale per slice along ``axis``)
and per group (:func:`quantize_per_group`: one scale per ``group_size`` consecutive values
along the last axis of a ``[out, in]`` weight; ``group_size=None`` is per output channel).
Integer widths 2 to 8 and 16; floating formats fp16, bf16 and fp8 are round-trip casts
(:func:`float_round_trip`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

EPS = torch.finfo(torch.float32).eps
INT_BITS = frozenset({2, 3, 4, 5, 6, 7, 8, 16})

FloatFormat = Literal["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"]
FLOAT_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
if hasattr(torch, "float8_e4m3fn"):  # torch >= 2.1 on every platform; guarded all the same
    FLOAT_DTYPES["fp8_e4m3"] = torch.float8_e4m3fn
if hasattr(torch, "float8_e5m2"):
    FLOAT_DTYPES["fp8_e5m2"] = torch.float8_e5m2


def check_bits(bits: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is an integer width this module implements."""
    if bits not in INT_BITS:
        raise ValueError(f"integer width {bits} is not supported; use one of {sorted(INT_BITS)}")


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """The integer range of a ``bits``-wide integer, two's complement when ``signed``."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def storage_dtype(bits: int, signed: bool) -> torch.dtype:
    """The narrowest torch integer dtype that holds ``bits``-wide values."""
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int16 if signed and bits <= 16 else torch.int32


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


# ---- per-group weights ------------------------------------------------------------------


@dataclass(frozen=True)
class GroupQuantized:
    """Integers of a ``[out, in]`` weight with one scale (and zero point) per group.

    ``q``: ``[out, in]`` integers (see :func:`storage_dtype`), signed in
    ``[-(2^(b-1)-1), 2^(b-1)-1]`` when ``zero_point is None`` (symmetric), else unsigned in
    ``[0, 2^b-1]``. ``scale`` and ``zero_point``: ``[out, in // group_size]`` (one column
    when ``group_size is None``, i.e. per output channel).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int | None

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self) -> torch.Tensor:
        return dequantize_per_group(self.q, self.scale, self.zero_point, self.group_size)


def check_group_size(in_features: int, group_size: int | None, where: str = "") -> None:
    """Raise ``ValueError`` unless ``group_size`` (None: whole rows) divides ``in_features``."""
    if group_size is None:
        return
    if group_size <= 0 or in_features % group_size:
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}group_size {group_size} does not divide the {in_features} input features"
        )


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[out, in]`` -> ``[out, groups, group_size]`` (a view)."""
    out_features, in_features = w.shape
    size = in_features if group_size is None else group_size
    return w.reshape(out_features, in_features // size, size)


def group_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and unsigned zero point, or None when symmetric) for ranges ``[lo, hi]``."""
    if symmetric:
        return symmetric_scale(torch.maximum(lo.abs(), hi.abs()), bits), None
    scale, zero_point = asymmetric_qparams(lo, hi, bits)
    return scale, zero_point.to(torch.uint8 if bits <= 8 else torch.int32)


ROW_BLOCK_BYTES = 32 << 20  # fp32 rows quantized at a time (quantize_with_qparams)


def quantize_with_qparams(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int | None,
) -> torch.Tensor:
    """Integers of ``w`` ``[out, in]`` under per-group params ``[out, groups]``, a block of
    rows at a time (each row's integers depend on that row alone): the float temporaries
    stay within ``ROW_BLOCK_BYTES`` instead of three copies of an LM head's weight."""
    w = w.detach()  # integers carry no gradient
    q = torch.empty(w.shape, dtype=storage_dtype(bits, signed=zero_point is None))
    rows = max(1, ROW_BLOCK_BYTES // (4 * max(w.shape[1], 1)))
    for r1 in range(0, w.shape[0], rows):
        r2 = r1 + rows
        zero = None if zero_point is None else zero_point[r1:r2]
        q[r1:r2] = _rows_quantized(w[r1:r2], scale[r1:r2], zero, bits, group_size)
    return q


def _rows_quantized(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int | None,
) -> torch.Tensor:
    g = _grouped(w.float(), group_size)
    if zero_point is None:
        qmax = 2 ** (bits - 1) - 1
        q = torch.round(g / scale.unsqueeze(-1)).clamp(-qmax, qmax)
    else:
        qmin, qmax = int_range(bits, signed=False)
        q = (torch.round(g / scale.unsqueeze(-1)) + zero_point.unsqueeze(-1).float()).clamp(
            qmin, qmax
        )
    return q.reshape(w.shape)


def quantize_per_group(
    weight: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True
) -> GroupQuantized:
    """Round-to-nearest ``bits``-wide integers of ``weight`` ``[out, in]``, min-max per group.

    ``group_size=None`` gives one scale per output channel; otherwise ``group_size`` must
    divide the input features (``ValueError`` if not).
    """
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    check_group_size(weight.shape[1], group_size)
    g = _grouped(weight.detach().float(), group_size)
    scale, zero_point = group_qparams(g.amin(-1), g.amax(-1), bits, symmetric)
    q = quantize_with_qparams(weight.detach(), scale, zero_point, bits, group_size)
    return GroupQuantized(q, scale, zero_point, bits, group_size)


def dequantize_per_group(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int | None,
) -> torch.Tensor:
    """Float ``[out, in]`` weights from per-group integers (inverse of quantization)."""
    g = _grouped(q, group_size).float()
    if zero_point is not None:
        g = g - zero_point.unsqueeze(-1).float()
    return (g * scale.unsqueeze(-1)).reshape(q.shape)


# ---- floating-point formats ---------------------------------------------------------------


def float_round_trip(x: torch.Tensor, fmt: str, saturate: bool = True) -> torch.Tensor:
    """``x`` cast to ``fmt`` (fp16, bf16, fp8_e4m3, fp8_e5m2) and back to ``x``'s dtype.

    Values beyond the format's largest finite value saturate to it when ``saturate`` (the
    convention of fp8 inference); otherwise the cast decides (torch saturates e4m3fn, which
    has no infinity, and overflows e5m2 to inf).
    """
    if fmt not in FLOAT_DTYPES:
        raise ValueError(
            f"float format {fmt!r} is not available; use one of {sorted(FLOAT_DTYPES)}"
        )
    dtype = FLOAT_DTYPES[fmt]
    y = x
    if saturate:
        limit = torch.finfo(dtype).max
        y = x.clamp(-limit, limit)
    return y.to(dtype).to(x.dtype)
