"""A Linear layer with weight-only N-bit integers, run on integer-weight kernels.

Storage (the ``state_dict``, hence the torch artifact): the ``[out, in]`` integers packed
densely (8 bits: one byte each; 4 bits: two per byte; 3 bits: eight values in three
bytes; 2 bits: four per byte; see :mod:`qatbench.quant.packing`), one fp32 scale per group
of ``group_size`` input features (``None``: per output channel), and for asymmetric
weights one uint8 zero point per group. Activations stay floating point.

Torch execution picks the kernel once, at construction (``torch_kernel``):

- ``int8pack_mm``: 5 to 8 bits per output channel run ``aten._weight_int8pack_mm``
  on the int8 weights as stored (asymmetric weights add a rank-1 zero-point correction).
- ``int4pack_mm``: 2 to 4 bits, per channel or in groups of 32, 64, 128 or 256, run
  ``aten._weight_int4pack_mm_for_cpu`` on weights repacked once into its layout (2- and
  3-bit values are exact in 4 bits; rows are padded to a multiple of 16 and per-channel
  inputs to a multiple of 32 features, zeros that add nothing).
- ``dequantize``: anything else (groups of 16, or 5 to 8 bits in groups) has no kernel
  here: the weight is unpacked and dequantized to fp32 on every call, nothing cached.
  Such a layer says so: ``dequantizes_per_call`` is True, and an experiment that would
  build one for torch is refused at validate unless it sets ``allow_dequantize``
  (:class:`qatbench.methods.rtn.WeightOnlyConfig`; docs/language-models.md).

Both kernels take bfloat16 activations (their fp32-activation variants run scalar code:
4 to 35 times slower than an fp32 Linear on an AVX2 machine), so inputs are cast to
bf16 and outputs back to fp32; that rounding (about 2^-9 relative) is part of what the
method measures. Speed against an fp32 ``nn.Linear``, paired rounds, one thread, a 2-core
AVX2 EPYC without VNNI: a 4096x4096 Linear runs 2.0x (int8pack_mm) and 2.7x (int4pack_mm,
group 128) faster at batch 1, but 0.84x and 0.6x (slower) at batch 64, where a CPU
without native bf16 arithmetic loses to fp32 GEMM; the 784-512-256-128-10 MLP runs 0.65x
to 0.8x at batch 1 (its weights fit in cache, so the per-call casts dominate) and about
0.5x at batch 64. The ``dequantize`` path runs 0.02x to 0.16x. onnxruntime's MatMulNBits
(see the ONNX form below) beats both: 4x to 8x at batch 1, 1.2x to 1.7x at batch 64 on
the 4096 Linear.

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
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F

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
WEIGHT_ONLY_BITS = frozenset({2, 3, 4, 5, 6, 7, 8})


# Resolved once: looking an operator up on torch.ops costs microseconds per call.
_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


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
        self.torch_kernel = choose_kernel(bits, group_size)
        self._kernel_group = 0
        self._padded_in = in_features

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

    def effective_weight(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight the layer computes with: ``x @ W.T + bias``."""
        weight = self.dequantized_weight()
        return weight if self.input_scale is None else weight * self.input_scale

    # ---- kernels -----------------------------------------------------------------------

    def _build_kernel(self) -> None:
        """Build the kernel operands from the stored integers (non-persistent buffers)."""
        for name in ("kernel_weight", "kernel_scales", "kernel_zero_term"):
            self._buffers.pop(name, None)
            self.__dict__.pop(name, None)
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
        self._kernel_group, self._padded_in = group, padded_k
        self._register_kernel("kernel_weight", packed)
        self._register_kernel("kernel_scales", scales_and_zeros.to(KERNEL_DTYPE))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._build_kernel()  # new integers: new kernel operands

    # ---- execution ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        # Buffers read from the dict directly: nn.Module.__getattr__ costs about a
        # microsecond per name, a fifth of a small layer's whole kernel call at batch 1.
        buffers = self._buffers
        input_scale, bias = buffers["input_scale"], buffers["bias"]
        if input_scale is not None:
            x = x * input_scale
        kernel = self.torch_kernel
        if kernel == "dequantize":
            return F.linear(x.float(), self.dequantized_weight(), bias)
        in_features, out_features = self.in_features, self.out_features
        x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
        xb = x2.to(KERNEL_DTYPE)
        if self._padded_in != in_features:
            xb = F.pad(xb, (0, self._padded_in - in_features))
        weight = self.__dict__.get("kernel_weight")  # int8 in place: a plain attribute
        if weight is None:
            weight = buffers["kernel_weight"]
        if kernel == "int8pack_mm":
            assert _INT8_MM is not None  # chosen only where the operator exists
            y = _INT8_MM(xb, weight, buffers["kernel_scales"])
            if not self.symmetric:
                zero_term = buffers["kernel_zero_term"]
                assert zero_term is not None  # built for every asymmetric int8 layer
                y = y.float() - xb.sum(-1, keepdim=True, dtype=torch.float32) * zero_term
        else:
            assert _INT4_MM is not None  # chosen only where the operator exists
            y = _INT4_MM(xb, weight, self._kernel_group, buffers["kernel_scales"])
            if y.shape[-1] != out_features:
                y = y[:, :out_features]
        # One op: bf16 + fp32 bias promotes to fp32 (no separate cast, no in-place add).
        y = y.float() if bias is None else torch.add(bias, y)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Integers and scales transposed to the [in, out] layout of the ONNX MatMul, outside
        # the traced graph, so they become initializers the lowering pass can repack.
        if self.input_scale is not None:
            x = x * self.input_scale
        q_t = torch.from_numpy(self.int_weight().numpy().T.copy())
        scales_t = self.scales.t().contiguous()
        zp_t = self.zero_points.t().contiguous() if not self.symmetric else None
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
    ``{"torch_kernels": {kernel: layers}, "dequantizes_per_call": bool}``."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, WeightOnlyLinear):
            counts[module.torch_kernel] = counts.get(module.torch_kernel, 0) + 1
    return {"torch_kernels": counts, "dequantizes_per_call": "dequantize" in counts}
