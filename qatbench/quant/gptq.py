"""GPTQ: weight quantization that corrects each column's rounding error with the Hessian.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023), Algorithm 1, as AutoGPTQ's ``GPTQ.fasterquant`` implements it:
with ``H = 2 X^T X`` over the layer's calibration inputs, quantize the columns of ``W`` one
at a time; the error of column ``i`` (scaled by ``1 / [H^-1]_ii``) is pushed onto the not
yet quantized columns through the upper Cholesky factor of ``H^-1``, in blocks of
``block_size`` columns with lazy batch updates of the rest.

Options: ``damp`` (fraction of the mean Hessian diagonal added to it), ``group_size``
(``None``: per output channel), ``act_order`` (columns in decreasing ``diag(H)``; with
groups, the group parameters are computed up front on the original contiguous groups --
AutoGPTQ's ``static_groups`` -- so the stored layout stays contiguous), ``symmetric``.
Returns the same :class:`~qatbench.quant.affine.GroupQuantized` as round-to-nearest.
"""

from __future__ import annotations

import torch

from qatbench.quant.affine import (
    GroupQuantized,
    check_bits,
    check_group_size,
    group_qparams,
    quantize_with_qparams,
    storage_dtype,
)

ROW_BLOCK_BYTES = 32 << 20  # float64 rows quantized at a time: 4096 rows of 1,024 inputs


class HessianAccumulator:
    """Running ``2/n * sum x^T x`` of a layer's inputs (rows of the flattened input)."""

    def __init__(self, in_features: int) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.samples = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).double()
        n = rows.shape[0]
        total = self.samples + n
        self.hessian *= self.samples / total
        self.hessian += (2.0 / total) * rows.t() @ rows
        self.samples = total


def _params(
    w: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero point) of each row of ``w`` ``[out, n]``: ``[out]`` each."""
    return group_qparams(w.amin(dim=1), w.amax(dim=1), bits, symmetric)


def _quant_column(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers, dequantized values) of one column ``[out]``."""
    q = quantize_with_qparams(
        w.unsqueeze(1), scale.unsqueeze(1), None if zero is None else zero.unsqueeze(1), bits, None
    ).squeeze(1)
    deq = q.float() - (0.0 if zero is None else zero.float())
    return q, deq * scale


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; the damping grows
    tenfold (at most three times) while ``H`` is not numerically positive definite."""
    mean_diag = torch.mean(torch.diag(h))
    for attempt in range(4):
        # At most two [in, in] float64 matrices besides ``h`` at once (a 5,632-wide MLP's
        # are 254 MB each; the damped copy, its factor and the inverse had all been alive).
        damped = h.clone()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        try:
            factor = torch.linalg.cholesky(damped)
            del damped
            inverse = torch.cholesky_inverse(factor)
            del factor
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError(f"gptq: the Hessian is not positive definite even with damping {damp * 1e3}")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> GroupQuantized:
    """Quantize ``weight`` ``[out, in]`` given the input Hessian ``[in, in]``."""
    check_bits(bits)
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    h = hessian.double()
    dead = torch.diag(h) == 0
    if bool(dead.any()):  # written only where needed: no copy of a whole Hessian else
        h = h.clone()
        h[dead, dead] = 1.0

    groups = 1 if group_size is None else in_features // group_size
    size = in_features if group_size is None else group_size
    scales = torch.empty(out_features, groups, dtype=torch.float32)
    zeros = None if symmetric else torch.empty(out_features, groups, dtype=torch.uint8)
    static = group_size is None or act_order
    if static:  # parameters from the original weights, before any error feedback
        for g in range(groups):
            columns = slice(g * size, (g + 1) * size)
            wg = weight[:, columns].detach().float().clone()
            wg[:, dead[columns]] = 0.0
            s, z = _params(wg, bits, symmetric)
            scales[:, g] = s
            if zeros is not None and z is not None:
                zeros[:, g] = z

    perm = torch.arange(in_features)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        h = h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp)
    del h

    q_int = torch.empty(out_features, in_features, dtype=storage_dtype(bits, signed=symmetric))
    # Rows are independent (each row's error moves along its own columns): a block of rows
    # at a time bounds the float64 working copies (an LM head's were 4x its fp32 weight).
    rows = max(1, ROW_BLOCK_BYTES // (8 * in_features))
    for r1 in range(0, out_features, rows):
        r2 = min(r1 + rows, out_features)
        w = weight[r1:r2].detach().double()
        w[:, dead] = 0.0
        if act_order:
            w = w[:, perm]
        _quantize_rows(
            w,
            hinv,
            perm,
            size,
            bits,
            symmetric,
            static,
            block_size,
            scales[r1:r2],
            None if zeros is None else zeros[r1:r2],
            q_int[r1:r2],
        )
    return GroupQuantized(q_int, scales, zeros, bits, group_size)


def _quantize_rows(
    w: torch.Tensor,
    hinv: torch.Tensor,
    perm: torch.Tensor,
    size: int,
    bits: int,
    symmetric: bool,
    static: bool,
    block_size: int,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    q_out: torch.Tensor,
) -> None:
    """GPTQ's column loop over rows ``w`` (float64, updated in place; permuted columns
    under act-order), writing their integers into ``q_out`` and, unless ``static``, their
    groups' parameters into ``scales``/``zeros`` (views of the whole layer's)."""
    in_features = w.shape[1]
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // size
            if not static and col % size == 0:
                # A new group: parameters from the weights as updated by earlier blocks.
                s, z = _params(w[:, col : col + size].float(), bits, symmetric)
                scales[:, g] = s
                if zeros is not None and z is not None:
                    zeros[:, g] = z
            zero = None if zeros is None else zeros[:, g]
            q, deq = _quant_column(w1[:, i].float(), scales[:, g], zero, bits)
            q_out[:, col] = q
            d = hinv1[i, i]
            e = (w1[:, i] - deq.double()) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
