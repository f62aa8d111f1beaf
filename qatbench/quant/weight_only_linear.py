"""A Linear layer with weight-only N-bit integers, run on integer-weight kernels.

Storage (the ``state_dict``, hence the torch artifact): the ``[out, in]`` integers packed
densely (8 bits: one byte each; 4 bits: two per byte; 3 bits: eight values in three
bytes; 2 bits: four per byte; see :mod:`qatbench.quant.packing`), one fp32 scale per group
of ``group_size`` input features (``None``: per output channel), and for asymmetric
weights one uint8 zero point per group. Activations stay floating point.

Torch execution picks the kernel once, at construction (``torch_kernel``):

- ``int8pack_mm``: 5 to 8 bits per output channel run ``aten._weight_int8pack_mm``
  on the int8 weights as stored (asymmetric weights add a rank-1 zero-point correction),
  for up to ``INT8_WIDEN_ROWS - 1`` rows (decoding: one token at a time). From
  ``INT8_WIDEN_ROWS`` rows on (a prompt, a batch), on a CPU with native bf16 arithmetic
  (AVX512-BF16 or AMX), the same int8 weights are widened to bf16 for the call (exact:
  no scale applied, nothing kept) and multiplied in one oneDNN bf16 GEMM that accumulates
  in fp32; the per-channel scales and the bias follow in fp32. Storage and numerics are
  the kernel's: bf16 activations, exact integer weights, fp32 sums rounded once to bf16,
  the same bf16-rounded scales.
- ``int4pack_mm``: 2 to 4 bits, per channel or in groups of 32, 64, 128 or 256, run
  ``aten._weight_int4pack_mm_for_cpu`` on weights repacked once into its layout (2- and
  3-bit values are exact in 4 bits; rows are padded to a multiple of 16 and per-channel
  inputs to a multiple of 32 features, zeros that add nothing).
- ``dequantize``: anything else (groups of 16, or 5 to 8 bits in groups) has no kernel
  here: the weight is unpacked and dequantized to fp32 on every call, nothing cached.
  Such a layer says so: ``dequantizes_per_call`` is True, and an experiment that would
  build one for torch is refused at validate unless it sets ``allow_dequantize``
  (:class:`qatbench.methods.rtn.WeightOnlyConfig`; docs/language-models.md).

Both kernels accept fp32 activations, but run them in scalar code (7 to 50 times slower
than their bf16 path, 1 thread, AVX512 EPYC, torch 2.13), so inputs are cast to bf16 and
outputs back to fp32; that rounding (about 2^-9 relative) is part of what the method
measures. Per layer, against an ``nn.Linear`` call (``thread_time``, paired rounds, one
thread, 2-core AMD EPYC with avx512_vnni and avx512_bf16, torch 2.13), as ratios of fp32's
time to the layer's (above 1: faster):

=================  =====  =====  =====  =====  =====  =====
int8 layer, rows     1      8     16     32     64     96
=================  =====  =====  =====  =====  =====  =====
768x3072 kernel    1.34   1.34   1.06   0.91   0.85   0.83
768x3072 widened   0.34   1.07   1.33   1.59   1.76   1.84
3072x768 kernel    1.30   1.79   1.30   1.03   0.90   0.86
3072x768 widened   0.33   1.35   1.52   1.63   1.80   1.85
128x512 kernel     0.75   0.78   0.68   0.62   0.56   0.55
128x512 widened    0.24   0.46   0.59   0.79   1.00   1.16
=================  =====  =====  =====  =====  =====  =====

One row (a decoded token at batch 1) is where an op's fixed cost (1 to 3 us) is most of a
call, so it is one native call (:mod:`qatbench.quant.native_rows`): the input cast (and
AWQ-scaled) into a bf16 scratch row the layer keeps per input shape and thread, already
padded for the kernel, the kernel, and the bias added with the cast back, in C++. Where
that function does not build, the same three steps run as three ops. More rows run cast,
reshape, kernel, bias add, view.

``_weight_int8pack_mm`` is a matrix-vector kernel: it wins where a call reads the weights
for a few rows, and loses to fp32 GEMM from a few dozen rows on; widening wins from about
16 rows at GPT-2's width and, at every width, beats the kernel from 32 rows
(``INT8_WIDEN_ROWS``). At a width of 128, as three ops, the packed kernels only drew level
with an fp32 ``nn.Linear`` for one row: the kernel saves 1 to 3 us over fp32's 6 to 9, and
the copy into the scratch row (0.9 us) and the bias add that casts the output back
(2.7 us) spent most of it again; the native row takes them out (see
:mod:`qatbench.quant.native_rows` for the figures). The ``dequantize`` path runs 0.02x to
0.16x.
onnxruntime's MatMulNBits (see the ONNX form below) is faster still at batch 1.

The kernels' operands are non-persistent buffers: counted as resident weights, not saved
(the int4 layout is a second copy of the weights in memory, half a byte per weight; 8-bit
symmetric weights are used in place). An optional per-feature ``input_scale`` (AWQ's
``1 / s``) multiplies the input first. ONNX export emits a placeholder node that
:mod:`qatbench.quant.weight_only_onnx` lowers to ``DequantizeLinear`` (int4/uint4/int2/
uint2/int8/uint8 initializers, blocked by ``group_size``) + ``MatMul``, which onnxruntime
fuses into ``MatMulNBits``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F

from qatbench.quant import native_rows
from qatbench.quant.affine import (
    GroupQuantized,
    check_group_size,
    dequantize_per_group,
    quantize_per_group,
)
from qatbench.quant.packing import pack_bits, unpack_bits
from qatbench.quant.weight_only_onnx import required_opset

INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts
KERNEL_DTYPE = torch.bfloat16
DEQUANTIZE_BLOCK_BYTES = 32 << 20  # fp32 weight rows the dequantize path makes at a time
#: From this many rows (prompt tokens x batch) an int8 layer runs oneDNN's bf16 GEMM on its
#: integers widened to bf16 for the call, where the CPU has native bf16 (measured in the
#: module docstring: ``_weight_int8pack_mm`` is a GEMV-shaped kernel that loses to fp32 GEMM
#: from a few dozen rows on); below it, and on CPUs without native bf16, the packed kernel.
INT8_WIDEN_ROWS = 32
WEIGHT_ONLY_BITS = frozenset({2, 3, 4, 5, 6, 7, 8})


# Resolved once: looking an operator up on torch.ops costs microseconds per call.
_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


def _native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where oneDNN's bf16
    GEMM is fast; without it, oneDNN emulates bf16 and widening int8 weights loses."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


NATIVE_BF16 = _native_bf16()
NEVER = 2**62
_thread = threading.get_ident


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's bf16 output in fp32 plus the bias: one op (bf16 + fp32 promotes)."""
    return y.float() if bias is None else torch.add(bias, y)


def choose_kernel(bits: int, group_size: int | None) -> str:
    """The torch kernel for ``bits``-wide weights in groups of ``group_size`` (see module)."""
    grouping_ok = group_size is None or group_size in INT4_KERNEL_GROUPS
    if bits <= 4 and grouping_ok and _INT4_MM is not None:
        return "int4pack_mm"
    if bits <= 8 and group_size is None and _INT8_MM is not None:
        return "int8pack_mm"
    return "dequantize"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class WeightOnlyLinear(torch.nn.Module):
    """Weight-only quantized replacement of ``nn.Linear``; build with :meth:`from_float`
    or :meth:`from_quantized`."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    bias: torch.Tensor | None
    input_scale: torch.Tensor | None
    kernel_weight: torch.Tensor
    kernel_scales: torch.Tensor
    kernel_zero_term: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = None,
        symmetric: bool = True,
        bias: bool = True,
        input_scaled: bool = False,
    ) -> None:
        super().__init__()
        if bits not in WEIGHT_ONLY_BITS:
            raise ValueError(f"weight-only bits must be one of {sorted(WEIGHT_ONLY_BITS)}")
        check_group_size(in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = 1 if group_size is None else in_features // group_size
        n = in_features * out_features
        self.register_buffer("qweight", torch.zeros((n * bits + 7) // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer(
            "zero_points",
            torch.zeros((0,) if symmetric else (out_features, groups), dtype=torch.uint8),
        )
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # Per-input-feature factor applied to x before the product (AWQ's 1 / s), if any.
        self.register_buffer("input_scale", torch.ones(in_features) if input_scaled else None)
        self._torch_kernel = choose_kernel(bits, group_size)
        if self._torch_kernel != "dequantize":  # built (once a machine) while converting
            native_rows.one_row_kernel()
        self._int8_widen_rows = INT8_WIDEN_ROWS if NATIVE_BF16 else NEVER
        self._kernel_group = 0
        self._padded_in, self._padded_out = in_features, False

    @property
    def torch_kernel(self) -> str:
        """``int8pack_mm``, ``int4pack_mm`` or ``dequantize`` (module docstring)."""
        return self._torch_kernel

    @torch_kernel.setter
    def torch_kernel(self, kernel: str) -> None:
        self._torch_kernel = kernel
        self.__dict__.pop("_scratch", None)  # the one-row path follows the kernel

    @property
    def int8_widen_rows(self) -> int:
        """Rows (tokens) from which an ``int8pack_mm`` layer widens its integers to bf16
        for one oneDNN GEMM instead (:data:`INT8_WIDEN_ROWS`; ``NEVER`` without native bf16)."""
        return self._int8_widen_rows

    @int8_widen_rows.setter
    def int8_widen_rows(self, rows: int) -> None:
        self._int8_widen_rows = rows
        self.__dict__.pop("_scratch", None)

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def from_quantized(
        cls,
        quantized: GroupQuantized,
        bias: torch.Tensor | None,
        input_scale: torch.Tensor | None = None,
    ) -> WeightOnlyLinear:
        """Wrap integers made by :func:`~qatbench.quant.affine.quantize_per_group` (or GPTQ,
        AWQ); ``input_scale`` multiplies each input feature before the product."""
        out_features, in_features = quantized.q.shape
        layer = cls(
            in_features,
            out_features,
            quantized.bits,
            quantized.group_size,
            quantized.symmetric,
            bias is not None,
            input_scale is not None,
        )
        if input_scale is not None:
            layer.input_scale = input_scale.detach().float().clone()
        layer.qweight = pack_bits(quantized.q, quantized.bits, signed=quantized.symmetric)
        layer.scales = quantized.scale.float().clone()
        if quantized.zero_point is not None:
            layer.zero_points = quantized.zero_point.to(torch.uint8).clone()
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        layer._build_kernel()
        return layer

    @classmethod
    def from_float(
        cls,
        linear: torch.nn.Linear,
        bits: int,
        group_size: int | None = None,
        symmetric: bool = True,
    ) -> WeightOnlyLinear:
        """Round-to-nearest, min-max per group."""
        quantized = quantize_per_group(linear.weight, bits, group_size, symmetric)
        return cls.from_quantized(quantized, linear.bias)

    # ---- views of the stored integers --------------------------------------------------

    @property
    def onnx_opset(self) -> int:
        """The ONNX opset the exported graph needs (read by ``export_onnx``)."""
        return required_opset(self.bits)

    @property
    def dequantizes_per_call(self) -> bool:
        """True when torch runs no integer kernel and dequantizes the weight on each call."""
        return self.torch_kernel == "dequantize"

    def int_weight(self) -> torch.Tensor:
        """``[out, in]`` integers: int8 signed (symmetric) or uint8 unsigned (asymmetric)."""
        shape = (self.out_features, self.in_features)
        return unpack_bits(self.qweight, self.bits, shape, signed=self.symmetric)

    def zero_point_tensor(self) -> torch.Tensor | None:
        return None if self.symmetric else self.zero_points

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight the integers stand for (``input_scale`` not applied)."""
        return dequantize_per_group(
            self.int_weight(), self.scales, self.zero_point_tensor(), self.group_size
        )

    def dequantized_rows(self, r1: int, r2: int) -> torch.Tensor:
        """Rows ``r1:r2`` of :meth:`dequantized_weight`, unpacking only their bytes
        (``r1 * in_features * bits`` must fall on a byte: ``r1`` a multiple of 8 does)."""
        bits, n_in = self.bits, self.in_features
        start, end = r1 * n_in * bits, r2 * n_in * bits
        assert start % 8 == 0, "a block of rows must start on a byte"
        packed = self.qweight[start // 8 : (end + 7) // 8]
        q = unpack_bits(packed, bits, (r2 - r1, n_in), signed=self.symmetric)
        zero = self.zero_point_tensor()
        return dequantize_per_group(
            q, self.scales[r1:r2], None if zero is None else zero[r1:r2], self.group_size
        )

    def effective_weight(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight the layer computes with: ``x @ W.T + bias``."""
        weight = self.dequantized_weight()
        return weight if self.input_scale is None else weight * self.input_scale

    # ---- kernels -----------------------------------------------------------------------

    def _build_kernel(self) -> None:
        """Build the kernel operands from the stored integers (non-persistent buffers)."""
        for name in ("kernel_weight", "kernel_scales", "kernel_scales_fp32", "kernel_zero_term"):
            self._buffers.pop(name, None)
            self.__dict__.pop(name, None)
        self.__dict__.pop("_scratch", None)  # new operands: a new scratch row on next call
        if self.torch_kernel == "int8pack_mm":
            self._build_int8()
        elif self.torch_kernel == "int4pack_mm":
            self._build_int4()

    def _register_kernel(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor, persistent=False)

    def _build_int8(self) -> None:
        q = self.int_weight().to(torch.int16)
        scales = self.scales[:, 0]
        if not self.symmetric:  # (q - z) s = ((q - 128) - (z - 128)) s: int8 plus a rank-1 term
            zero = self.zero_points[:, 0].to(torch.int16) - 128
            q = q - 128
            self._register_kernel("kernel_zero_term", (zero.float() * scales).float())
        self._padded_in = _round_up(self.in_features, 8)  # the kernel reads K in steps of 8
        if self.symmetric and self._padded_in == self.in_features and self.bits == 8:
            # The stored bytes are the kernel's int8 operand: a view, not a second copy (a
            # plain attribute, so resident weights are not counted twice).
            shape = (self.out_features, self.in_features)
            self.kernel_weight = self.qweight.view(torch.int8).reshape(shape)
        else:
            weight = F.pad(q, (0, self._padded_in - self.in_features)).to(torch.int8)
            self._register_kernel("kernel_weight", weight.contiguous())
        self._register_kernel("kernel_scales", scales.to(KERNEL_DTYPE))
        # The same (bf16-rounded) scales in fp32 for the widened path: both paths agree.
        self._register_kernel("kernel_scales_fp32", scales.to(KERNEL_DTYPE).float())

    def _build_int4(self) -> None:
        n, k = self.out_features, self.in_features
        q = self.int_weight().to(torch.int32)
        scales = self.scales
        if self.symmetric:  # tinygemm computes (q' - 8) * s + m: q' = q + 8, m = 0
            q = q + 8
            mins = torch.zeros_like(scales)
        else:  # q' = q + c, m = (8 - c - z) * s, with the shift c that makes m smallest
            zero = self.zero_points.to(torch.int32)
            shift = (8 - zero).clamp(0, 16 - 2**self.bits)
            q = q + shift.repeat_interleave(q.shape[1] // shift.shape[1], dim=1)
            mins = (8 - shift - zero).float() * scales
        if self.group_size is None:
            padded_k = _round_up(k, INT4_KERNEL_GROUPS[-1])
            group = next(g for g in INT4_KERNEL_GROUPS if padded_k % g == 0)
            reps = padded_k // group
            scales, mins = scales.expand(n, reps), mins.expand(n, reps)
        else:
            padded_k, group = k, self.group_size
        padded_n = _round_up(n, 16)  # the packing wants rows in multiples of 16
        q = F.pad(q, (0, padded_k - k, 0, padded_n - n), value=8)
        scales = F.pad(scales, (0, 0, 0, padded_n - n))
        mins = F.pad(mins, (0, 0, 0, padded_n - n))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        scales_and_zeros = torch.stack([scales.t(), mins.t()], dim=-1).contiguous()
        self._kernel_group, self._padded_in, self._padded_out = group, padded_k, padded_n != n
        self._register_kernel("kernel_weight", packed)
        self._register_kernel("kernel_scales", scales_and_zeros.to(KERNEL_DTYPE))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._build_kernel()  # new integers: new kernel operands

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``torch.save`` of the model, a deep copy) without the int8 view of the
        stored bytes, which ``torch.save`` refuses (one storage as two dtypes), and
        without the one-row scratch (per thread, holding the native function): both are
        made again, the view when unpickled, the scratch on the next call."""
        state = self.__dict__.copy()
        state.pop("kernel_weight", None)
        state.pop("_scratch", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.torch_kernel != "dequantize":  # loaded now, not in the first (timed) call
            native_rows.one_row_kernel()
        if self.torch_kernel == "int8pack_mm" and self._buffers.get("kernel_weight") is None:
            shape = (self.out_features, self.in_features)
            self.kernel_weight = self.qweight.view(torch.int8).reshape(shape)

    # ---- execution ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cheap checks first: torch.onnx.is_in_onnx_export() alone costs about 2 us a call
        # (two imports), a tenth of a decode-sized layer; the exporter traces.
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            if torch.onnx.is_in_onnx_export():
                return self._export_forward(x)
        elif x.numel() == self.in_features and not x.requires_grad:  # one row: a decoded token
            scratch = self.__dict__.get("_scratch")
            if scratch is not None and scratch.shape == x.shape and scratch.thread == _thread():
                return self._one_row(x, scratch)
            if self._one_row_runs():
                scratch = self.__dict__["_scratch"] = _OneRowScratch(self, x.shape)
                return self._one_row(x, scratch)
        # Buffers read from the dict directly: nn.Module.__getattr__ costs about a
        # microsecond per name. Each tensor op costs 1 to 3 us at batch 1, as much as the
        # kernel of a 128-wide layer: the path below is as few ops as the kernel allows.
        buffers = self._buffers
        input_scale = buffers["input_scale"]
        if input_scale is not None:
            x = x * input_scale
        kernel = self.torch_kernel
        if kernel == "dequantize":
            return self._dequantized_linear(x.float())
        shape = x.shape
        xb = x.bfloat16()  # the kernels read bf16 (module doc); .to(dtype) parses slower
        if len(shape) != 2:
            xb = xb.reshape(-1, shape[-1])
        if self._padded_in != self.in_features:
            xb = F.pad(xb, (0, self._padded_in - self.in_features))
        weight = self.__dict__.get("kernel_weight")  # int8 in place: a plain attribute
        if weight is None:
            weight = buffers["kernel_weight"]
            assert weight is not None  # built with the layer
        if kernel == "int4pack_mm":
            assert _INT4_MM is not None  # chosen only where the operator exists
            y = _INT4_MM(xb, weight, self._kernel_group, buffers["kernel_scales"])
            if self._padded_out:
                y = y[:, : self.out_features]
            y = _add_bias(y, buffers["bias"])
        else:
            y = self._int8(xb, weight)
        return y if len(shape) == 2 else y.view(*shape[:-1], self.out_features)

    def _dequantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` from the integers dequantized a block of output rows at a
        time, so no call holds more than ``DEQUANTIZE_BLOCK_BYTES`` of fp32 weight (an LM
        head's whole weight and its unpacking's temporaries were half a GiB)."""
        # a multiple of 8 rows: every block starts on a byte of the packed integers
        rows = max(8, DEQUANTIZE_BLOCK_BYTES // (4 * self.in_features) // 8 * 8)
        bias = self._buffers["bias"]
        if rows >= self.out_features:
            return F.linear(x, self.dequantized_weight(), bias)
        parts = []
        for r1 in range(0, self.out_features, rows):
            r2 = min(r1 + rows, self.out_features)
            weight = self.dequantized_rows(r1, r2)
            parts.append(F.linear(x, weight, None if bias is None else bias[r1:r2]))
        return torch.cat(parts, dim=-1)

    def _one_row_runs(self) -> bool:
        """Whether one row takes :meth:`_one_row`: a kernel that needs no correction after
        it (not asymmetric int8) and does not widen a single row."""
        if self.torch_kernel == "int4pack_mm":
            return True
        return self.torch_kernel == "int8pack_mm" and self.symmetric and self.int8_widen_rows > 1

    def _one_row(self, x: torch.Tensor, scratch: _OneRowScratch) -> torch.Tensor:
        """One row (decoding at batch 1), where the fixed cost of each op is most of the
        call: the input is cast (and AWQ-scaled) in one op into this layer's bf16 scratch
        row, already shaped and padded for the kernel, and the bias, shaped like the
        output, is added with the cast back in one op: cast, kernel, add. The scratch is
        made once per input shape and thread (a thread that finds another's makes its own),
        dropped when the kernel's operands or ``torch_kernel`` change, and never returned."""
        buffers = self._buffers
        input_scale = buffers["input_scale"]
        weight = self.__dict__.get("kernel_weight")  # int8 in place: a plain attribute
        if weight is None:
            weight = buffers["kernel_weight"]
        native = scratch.native
        if native is not None:  # the three steps below in one call (native_rows.py)
            return native(  # type: ignore[no-any-return]
                x,
                input_scale,
                scratch.row,
                weight,
                buffers["kernel_scales"],
                scratch.group,
                buffers["bias"],
                self.out_features,
            )
        if input_scale is None:
            scratch.target.copy_(x)
        else:
            torch.mul(x, input_scale, out=scratch.target)
        if self.torch_kernel == "int4pack_mm":
            assert _INT4_MM is not None  # chosen only where the operator exists
            y = _INT4_MM(scratch.row, weight, self._kernel_group, buffers["kernel_scales"])
            if self._padded_out:
                y = y[:, : self.out_features]
        else:
            assert _INT8_MM is not None  # chosen only where the operator exists
            y = _INT8_MM(scratch.row, weight, buffers["kernel_scales"])
        if scratch.bias is None:
            return y.float().view(scratch.out_shape)
        return torch.add(scratch.bias, y)  # [1, .., 1, out] + [1, out]: the output's shape

    def _int8(self, xb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``xb @ W.T + bias`` for int8 weights: the packed kernel for few rows; from
        ``int8_widen_rows`` rows on, the integers widened to bf16 for this call (exact:
        integers up to 256 fit bf16's significand; no scale applied, nothing kept), one
        oneDNN bf16 GEMM accumulating in fp32, then the kernel's scales in fp32."""
        buffers = self._buffers
        bias = buffers["bias"]
        if xb.shape[0] < self.int8_widen_rows:
            assert _INT8_MM is not None  # chosen only where the operator exists
            y = _add_bias(_INT8_MM(xb, weight, buffers["kernel_scales"]), bias)
        else:
            scales = buffers["kernel_scales_fp32"]
            assert scales is not None  # built with every int8 layer
            y = F.linear(xb, weight.to(KERNEL_DTYPE))
            y = y * scales if bias is None else torch.addcmul(bias, y, scales)
        if self.symmetric:
            return y
        zero_term = buffers["kernel_zero_term"]
        assert zero_term is not None  # built for every asymmetric int8 layer
        return y - xb.sum(-1, keepdim=True, dtype=torch.float32) * zero_term

    @contextlib.contextmanager
    def onnx_export_operands(self) -> Iterator[None]:
        """For the duration of an export: the integers and scales transposed to the
        ``[in, out]`` layout of the ONNX MatMul, as buffers of the layer. The exporter
        takes buffers as initializers, which reach disk without passing through its
        protobuf message (:func:`qatbench.runtimes.onnx_weights.captured_weights`);
        computed while tracing they would be constants inside the message."""
        names = ("export_q_t", "export_scales_t", "export_zp_t")
        operands = (
            torch.from_numpy(self.int_weight().numpy().T.copy()),
            self.scales.t().contiguous(),
            self.zero_points.t().contiguous() if not self.symmetric else None,
        )
        for name, tensor in zip(names, operands, strict=True):
            self.register_buffer(name, tensor)  # persistent: the tracer reads the state dict
        try:
            yield
        finally:
            for name in names:
                del self._buffers[name]

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        # The operands are initializers the lowering pass repacks (onnx_export_operands).
        if self.input_scale is not None:
            x = x * self.input_scale
        buffers = self._buffers
        if "export_q_t" in buffers:
            q_t, scales_t, zp_t = (
                buffers["export_q_t"],
                buffers["export_scales_t"],
                buffers["export_zp_t"],
            )
        else:  # exported without the context: the same values, as traced constants
            q_t = torch.from_numpy(self.int_weight().numpy().T.copy())
            scales_t = self.scales.t().contiguous()
            zp_t = self.zero_points.t().contiguous() if not self.symmetric else None
        assert q_t is not None and scales_t is not None
        return _WeightOnlyExport.apply(
            x, q_t, scales_t, zp_t, self.bias, self.bits, self.group_size or 0, self.out_features
        )

    def extra_repr(self) -> str:
        grouping = "per-channel" if self.group_size is None else f"group {self.group_size}"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"in={self.in_features}, out={self.out_features}, w{self.bits} {grouping} {kind}, "
            f"kernel={self.torch_kernel}"
        )


class _OneRowScratch:
    """A layer's bf16 input row for :meth:`WeightOnlyLinear._one_row`: ``target`` (shaped
    like the input) is written each call; ``row`` is the same memory as the kernel's 2-d
    operand, zero-padded to the kernel's width; ``bias`` is shaped like the output."""

    __slots__ = ("bias", "group", "native", "out_shape", "row", "shape", "target", "thread")

    def __init__(self, layer: WeightOnlyLinear, shape: torch.Size) -> None:
        self.shape, self.thread = shape, _thread()
        self.native = native_rows.one_row_kernel()  # None: the three ops
        self.group = layer._kernel_group if layer.torch_kernel == "int4pack_mm" else 0
        lead = (1,) * (len(shape) - 1)
        padded = torch.zeros((*lead, layer._padded_in), dtype=KERNEL_DTYPE)
        self.target = padded[..., : layer.in_features]
        self.row = padded.view(1, layer._padded_in)
        self.out_shape = (*lead, layer.out_features)
        bias = layer._buffers["bias"]
        self.bias = None if bias is None else bias.view(self.out_shape)


class _WeightOnlyExport(torch.autograd.Function):
    """Only used while exporting: a ``qatbench::WeightOnlyMatMul`` placeholder node."""

    @staticmethod
    def forward(  # the traced value is irrelevant to the graph; shape and dtype must be right
        ctx: Any,
        x: torch.Tensor,
        q_t: torch.Tensor,
        scales_t: torch.Tensor,
        zp_t: torch.Tensor | None,
        bias: torch.Tensor | None,
        bits: int,
        block_size: int,
        out_features: int,
    ) -> torch.Tensor:
        return x.new_zeros((*x.shape[:-1], out_features))

    @staticmethod
    def symbolic(  # the legacy exporter's hook
        g: Any,
        x: Any,
        q_t: Any,
        scales_t: Any,
        zp_t: Any,
        bias: Any,
        bits: int,
        block_size: int,
        out_features: int,
    ) -> Any:
        def given(value: Any) -> bool:
            return value is not None and not (hasattr(value, "node") and value.node().mustBeNone())

        # Inputs: x, q, scales, zero points ("" when symmetric), bias ("" when none).
        none = g.op("prim::Constant")
        none.setType(torch._C.OptionalType.ofTensor())
        inputs = [x, q_t, scales_t, zp_t if given(zp_t) else none, bias if given(bias) else none]
        y = g.op("qatbench::WeightOnlyMatMul", *inputs, bits_i=bits, block_size_i=block_size)
        sizes = x.type().varyingSizes() if x.type().dim() is not None else None
        if sizes is not None:
            y.setType(x.type().with_sizes([*sizes[:-1], out_features]))
        return y


@contextlib.contextmanager
def fp32_kernels(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` with its weight-only layers computing in fp32 from the dequantized
    integers for the duration (the simulated output of the same weights): the torch
    kernels round activations to bfloat16, which an fp32 runtime is not expected to match."""
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    kernels = [m.torch_kernel for m in layers]
    for m in layers:
        m.torch_kernel = "dequantize"
    try:
        yield model
    finally:
        for m, kernel in zip(layers, kernels, strict=True):
            m.torch_kernel = kernel


def kernel_summary(model: torch.nn.Module) -> dict[str, Any]:
    """What the model's weight-only layers run in torch, for a trial's details:
    ``{"torch_kernels": {kernel: layers}, "dequantizes_per_call": bool}``, plus the
    activations' dtype in the kernels (``torch_activations``) and how one row runs
    (``torch_one_row``: ``native``, or why three ops) where any runs, and
    ``int8_widened_from_rows`` (the row count from which the int8 layers run the widened
    bf16 GEMM; None: never, no native bf16) where int8 layers are."""
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    counts: dict[str, int] = {}
    for module in layers:
        counts[module.torch_kernel] = counts.get(module.torch_kernel, 0) + 1
    summary: dict[str, Any] = {
        "torch_kernels": counts,
        "dequantizes_per_call": "dequantize" in counts,
    }
    if counts.keys() - {"dequantize"}:
        summary["torch_activations"] = "bf16"
        summary["torch_one_row"] = native_rows.status()  # "native", or why three ops
    widen = {m.int8_widen_rows for m in layers if m.torch_kernel == "int8pack_mm"}
    if widen:  # from this many rows the int8 layers run the widened bf16 GEMM (None: never)
        summary["int8_widened_from_rows"] = min(widen) if min(widen) < NEVER else None
    return summary
