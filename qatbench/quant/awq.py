"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024).

Weights that meet large activations matter most. Per input feature ``j``, with ``a_j`` the
mean ``|x_j|`` over the calibration inputs, AWQ scales the weight columns by
``s_j = a_j^alpha`` (normalized to a geometric mean of 1) before quantizing and divides
the input by ``s`` at run time: ``y = (x / s) @ Q(W * s)^T``. ``alpha`` is searched on a
grid of ``grid`` values in ``[0, 1)`` for the smallest output error on the calibration
inputs (``alpha = 0`` is round-to-nearest, so the search never does worse there). With
``clip``, each output channel's group ranges are then shrunk by the factor (1.0 down to
0.5) that minimizes that group's contribution to the output error, as llm-awq's
``auto_clip`` does. The original folds ``1 / s`` into the preceding operator; here it is
kept as a per-feature input scale of the layer (an elementwise multiply per call), which
works after any preceding operator.
"""

from __future__ import annotations

import torch

from qatbench.quant.affine import (
    GroupQuantized,
    check_bits,
    check_group_size,
    group_qparams,
    quantize_per_group,
    quantize_with_qparams,
)

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5
CLIP_ROWS = 512  # calibration rows used by the clipping search (llm-awq uses fewer)
CLIP_CHUNK = 256  # output channels per step of the clipping search


def _output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(((x @ (approx - weight).t()) ** 2).mean())


def awq_scales(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    grid: int = 20,
) -> tuple[torch.Tensor, float]:
    """Per-input-feature scales ``s`` and the ``alpha`` that minimized the output error."""
    w = weight.detach().float()
    x = x.float()
    mean_abs = x.abs().mean(dim=0).clamp(min=1e-8)
    best_s, best_alpha, best_err = torch.ones_like(mean_abs), 0.0, float("inf")
    for i in range(grid):
        alpha = i / grid
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        approx = quantize_per_group(w * s, bits, group_size, symmetric).dequantize() / s
        err = _output_error(x, w, approx)
        if err < best_err:
            best_s, best_alpha, best_err = s, alpha, err
    return best_s, best_alpha


def awq_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> GroupQuantized:
    """Quantize with each (output channel, group) range shrunk by its best ratio."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    size = in_features if group_size is None else group_size
    groups = in_features // size
    wg = w.reshape(out_features, groups, size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    xg = x.float()[:CLIP_ROWS].reshape(-1, groups, size)
    best_err = torch.full((out_features, groups), float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for ratio in ratios:
        scale, zero = group_qparams(lo * ratio, hi * ratio, bits, symmetric)
        q = quantize_with_qparams(w, scale, zero, bits, group_size)
        deq = GroupQuantized(q, scale, zero, bits, group_size).dequantize()
        diff = (deq - w).reshape(out_features, groups, size)
        # error of each group's share of the output: mean over samples of (x_g . dw_g)^2,
        # in chunks of output channels to bound memory
        err = torch.cat(
            [
                torch.einsum("ngk,ogk->ogn", xg, chunk).pow(2).mean(-1)
                for chunk in diff.split(CLIP_CHUNK)
            ]
        )
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * ratio, best_lo)
        best_hi = torch.where(better, hi * ratio, best_hi)
    scale, zero = group_qparams(best_lo, best_hi, bits, symmetric)
    q = quantize_with_qparams(w, scale, zero, bits, group_size)
    return GroupQuantized(q, scale, zero, bits, group_size)


def awq_quantize(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    grid: int = 20,
    clip: bool = False,
) -> tuple[GroupQuantized, torch.Tensor]:
    """(integers of ``W * s``, ``1 / s``) for a layer whose inputs ``x`` are ``[n, in]``."""
    check_bits(bits)
    check_group_size(weight.shape[1], group_size)
    s, _alpha = awq_scales(weight, x, bits, group_size, symmetric, grid)
    scaled = weight.detach().float() * s
    if clip:
        quantized = awq_clip(scaled, x.float() / s, bits, group_size, symmetric)
    else:
        quantized = quantize_per_group(scaled, bits, group_size, symmetric)
    return quantized, 1.0 / s
