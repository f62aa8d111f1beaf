"""A Linear layer that stores integers and computes with integer kernels.

Weights: symmetric per-output-channel, 8 bits stored as int8, narrower ones packed densely
(4 bits two per byte, 2 bits four per byte, 3 bits eight per three bytes).
Activations: static, asymmetric uint8 (7-bit range by default, see ``from_float``) with
calibrated input and output ranges. Narrower inputs (``activation_bits`` below 8, e.g. 4)
are clamped to their calibrated range and quantized onto ``2**bits`` levels held in uint8:
the same integer kernels, fed integers of the narrower width.

Eager execution runs PyTorch's x86/fbgemm quantized GEMM (``quantized::linear``) on
prepacked weights built once, never a dequantize-per-call. The ONNX graph is the QDQ form
(QuantizeLinear/DequantizeLinear around MatMul) that onnxruntime fuses into its integer
kernels; see :class:`_QdqLinearExport`.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, NamedTuple

import torch

from qatbench.quant.affine import asymmetric_qparams, quantize_weight_per_channel
from qatbench.quant.packing import pack_bits, packed_size, unpack_bits

# PyTorch announces the deprecation of quantized tensors on every call; qatbench records the
# dependency in docs/methods-and-models.md ("Known limits") instead of repeating it per call.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)


class _Kernel(NamedTuple):
    """What one eager call needs, read once (a buffer read and ``float(tensor)`` cost about
    1 us each: a third of a small layer's call at batch 1)."""

    packed: Any  # quantized::linear_prepack's packed weights and bias
    in_scale: float
    in_zero_point: int
    out_scale: float
    out_zero_point: int
    clamp: tuple[float, float] | None  # the input range of sub-8-bit activations


# Prepacked GEMM operands live beside the modules, not on them: an attribute holding a
# TorchScript object would break tracing for ONNX export and pickling.
_PREPACKED: weakref.WeakKeyDictionary[torch.nn.Module, _Kernel] = weakref.WeakKeyDictionary()


class QuantizedLinear(torch.nn.Module):
    """Integer replacement of ``nn.Linear`` built by :meth:`from_float`."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor
    output_scale: torch.Tensor
    output_zero_point: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, weight_bits: int, activation_bits: int = 8
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.weight_bits = (
            in_features,
            out_features,
            weight_bits,
        )
        self.activation_bits = activation_bits
        n = in_features * out_features
        packed = weight_bits < 8
        self.register_buffer(
            "weight_q",
            torch.zeros(
                packed_size(n, weight_bits) if packed else n,
                dtype=torch.uint8 if packed else torch.int8,
            ),
        )
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))
        for name in ("input", "output"):
            self.register_buffer(f"{name}_scale", torch.tensor(1.0))
            self.register_buffer(f"{name}_zero_point", torch.tensor(0, dtype=torch.uint8))

    @classmethod
    def from_float(
        cls,
        linear: torch.nn.Linear,
        weight_bits: int,
        input_range: tuple[torch.Tensor, torch.Tensor],
        output_range: tuple[torch.Tensor, torch.Tensor],
        reduce_range: bool = True,
        activation_bits: int = 8,
    ) -> QuantizedLinear:
        """Quantize ``linear``'s weights; activation qparams from calibrated ranges.

        ``reduce_range`` maps 8-bit inputs onto 7 bits: x86 u8s8 kernels without VNNI
        (fbgemm, onnxruntime's MLAS) sum byte products pairwise into saturating int16, which
        overflows with full-range 8-bit inputs and 8-bit weights. ``activation_bits`` below
        8 quantizes inputs onto that many bits (``reduce_range`` is then moot).
        """
        q, scale = quantize_weight_per_channel(linear.weight, weight_bits)
        in_bits = activation_bits if activation_bits < 8 else (7 if reduce_range else 8)
        in_scale, in_zp = asymmetric_qparams(*input_range, bits=in_bits)
        out_scale, out_zp = asymmetric_qparams(*output_range, bits=8)
        return cls.from_quantized(
            q,
            scale,
            linear.bias,
            weight_bits,
            (in_scale, in_zp),
            (out_scale, out_zp),
            activation_bits=activation_bits,
        )

    @classmethod
    def from_quantized(
        cls,
        weight_q: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        weight_bits: int,
        input_qparams: tuple[torch.Tensor, torch.Tensor],
        output_qparams: tuple[torch.Tensor, torch.Tensor],
        activation_bits: int = 8,
    ) -> QuantizedLinear:
        """Build from integers already chosen (e.g. by quantization-aware training).

        ``weight_q`` is ``[out, in]`` int8 holding symmetric ``weight_bits``-bit values;
        ``*_qparams`` are (scale, zero point) of the uint8 input and output.
        """
        out_features, in_features = weight_q.shape
        layer = cls(in_features, out_features, weight_bits, activation_bits)
        q = weight_q.to(torch.int8)
        layer.weight_q = pack_bits(q, weight_bits) if weight_bits < 8 else q.flatten().clone()
        layer.weight_scale = weight_scale.detach().float().clone()
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        layer.input_scale = input_qparams[0].detach().float().reshape(()).clone()
        layer.input_zero_point = input_qparams[1].reshape(()).to(torch.uint8)
        layer.output_scale = output_qparams[0].detach().float().reshape(()).clone()
        layer.output_zero_point = output_qparams[1].reshape(()).to(torch.uint8)
        return layer

    def input_clamp(self) -> tuple[float, float] | None:
        """The float range of ``activation_bits``-wide inputs, or None at 8 bits."""
        if self.activation_bits >= 8:
            return None
        scale, zp = float(self.input_scale), int(self.input_zero_point)
        return -zp * scale, (2**self.activation_bits - 1 - zp) * scale

    def int_weight(self) -> torch.Tensor:
        """The weight integers as an ``[out, in]`` int8 tensor (unpacked if sub-byte)."""
        shape = (self.out_features, self.in_features)
        if self.weight_bits < 8:
            return unpack_bits(self.weight_q, self.weight_bits, shape)
        return self.weight_q.reshape(shape)

    def _prepacked(self) -> Any:
        return self._kernel().packed

    def _kernel(self) -> _Kernel:
        """The prepacked weights and the activation qparams as Python numbers, built on the
        first call after construction or loading: a forward pass reads no buffer."""
        kernel = _PREPACKED.get(self)
        if kernel is None:
            qweight = torch._make_per_channel_quantized_tensor(
                self.int_weight(),
                self.weight_scale.double(),
                torch.zeros(self.out_features, dtype=torch.long),
                0,
            )
            kernel = _PREPACKED[self] = _Kernel(
                torch.ops.quantized.linear_prepack(qweight, self.bias),
                float(self.input_scale),
                int(self.input_zero_point),
                float(self.output_scale),
                int(self.output_zero_point),
                self.input_clamp(),
            )
        return kernel

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        _PREPACKED.pop(self, None)  # new integers: prepack again on the next call
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # Unpacked outside the traced graph, so the integers become one int8 initializer.
            w_t = torch.from_numpy(self.int_weight().numpy().T.copy())
            bounds = self.input_clamp()
            if bounds is not None:
                x = torch.clamp(x, *bounds)
            return _QdqLinearExport.apply(
                x,
                w_t,
                self.weight_scale,
                self.bias,
                self.input_scale,
                self.input_zero_point,
                self.output_scale,
                self.output_zero_point,
            )
        k = self._kernel()
        if k.clamp is not None:
            x = torch.clamp(x, *k.clamp)
        xq = torch.quantize_per_tensor(x, k.in_scale, k.in_zero_point, torch.quint8)
        return torch.ops.quantized.linear(xq, k.packed, k.out_scale, k.out_zero_point).dequantize()

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, "
            f"w{self.weight_bits}a{self.activation_bits} static"
        )


class _QdqLinearExport(torch.autograd.Function):
    """Only used while exporting: emits the QDQ pattern onnxruntime fuses to integer ops."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_t: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        # The traced value is irrelevant to the graph; shape and dtype must be right.
        return x.new_zeros((*x.shape[:-1], w_t.shape[1]))

    @staticmethod
    def symbolic(  # the legacy exporter's hook; names follow torch's convention
        g: Any,
        x: Any,
        w_t: Any,
        w_scale: Any,
        bias: Any,
        in_scale: Any,
        in_zp: Any,
        out_scale: Any,
        out_zp: Any,
    ) -> Any:
        w_zp = g.op("Constant", value_t=torch.zeros(1, dtype=torch.int8))
        w_zp = g.op("Expand", w_zp, g.op("Shape", w_scale))
        xq = g.op("QuantizeLinear", x, in_scale, in_zp)
        xdq = g.op("DequantizeLinear", xq, in_scale, in_zp)
        wdq = g.op("DequantizeLinear", w_t, w_scale, w_zp, axis_i=1)
        y = g.op("Add", g.op("MatMul", xdq, wdq), bias)
        yq = g.op("QuantizeLinear", y, out_scale, out_zp)
        return g.op("DequantizeLinear", yq, out_scale, out_zp)
