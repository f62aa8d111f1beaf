"""Conv1d/Conv2d layers that store integers and convolve with integer kernels.

The convolution counterpart of :class:`~qatbench.quant.quantized_linear.QuantizedLinear`,
with the same number formats: symmetric per-output-channel weights (8 bits as int8,
narrower ones packed densely), static asymmetric uint8 activations from calibrated ranges
(7-bit inputs by default, narrower inputs clamped onto ``2**bits`` levels). Grouped and
depthwise convolutions included. BatchNorm is folded into the conv before it is observed
(:mod:`qatbench.quant.batchnorm`), so one integer conv replaces conv+BN.

Eager execution runs PyTorch's x86/fbgemm quantized convolution (``quantized::conv1d`` /
``quantized::conv2d``) on weights prepacked once. The ONNX graph is the QDQ form
(QuantizeLinear/DequantizeLinear around Conv) that onnxruntime fuses into ``QLinearConv``.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from qatbench.quant.affine import asymmetric_qparams, quantize_weight_per_channel
from qatbench.quant.packing import pack_bits, packed_size, unpack_bits

# importing quantized_linear silences torch's per-call deprecation warning of quantized tensors
from qatbench.quant.quantized_linear import QuantizedLinear  # noqa: F401

_PREPACKED: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()

CONV_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d)


def convertible(conv: torch.nn.Module) -> bool:
    """Whether ``conv`` is a Conv1d/Conv2d the integer kernels take (zero padding given as
    integers or ``"valid"``)."""
    if not isinstance(conv, CONV_TYPES):
        return False
    padding = conv.padding
    return conv.padding_mode == "zeros" and (not isinstance(padding, str) or padding == "valid")


class QuantizedConv(torch.nn.Module):
    """Integer replacement of ``nn.Conv1d``/``nn.Conv2d`` built by :meth:`from_float`."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor
    output_scale: torch.Tensor
    output_zero_point: torch.Tensor

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        weight_bits: int,
        activation_bits: int = 8,
    ) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.dims = len(weight_shape) - 2  # 1 or 2
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = groups
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        n = 1
        for d in weight_shape:
            n *= d
        packed = weight_bits < 8
        self.register_buffer(
            "weight_q",
            torch.zeros(
                packed_size(n, weight_bits) if packed else n,
                dtype=torch.uint8 if packed else torch.int8,
            ),
        )
        self.register_buffer("weight_scale", torch.ones(weight_shape[0]))
        self.register_buffer("bias", torch.zeros(weight_shape[0]))
        for name in ("input", "output"):
            self.register_buffer(f"{name}_scale", torch.tensor(1.0))
            self.register_buffer(f"{name}_zero_point", torch.tensor(0, dtype=torch.uint8))

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @classmethod
    def from_float(
        cls,
        conv: torch.nn.Conv1d | torch.nn.Conv2d,
        weight_bits: int,
        input_range: tuple[torch.Tensor, torch.Tensor],
        output_range: tuple[torch.Tensor, torch.Tensor],
        reduce_range: bool = True,
        activation_bits: int = 8,
    ) -> QuantizedConv:
        """Quantize ``conv``'s weights per output channel; activation qparams from the
        calibrated ranges (``reduce_range`` as in :meth:`QuantizedLinear.from_float`)."""
        q, scale = quantize_weight_per_channel(conv.weight, weight_bits)
        in_bits = activation_bits if activation_bits < 8 else (7 if reduce_range else 8)
        return cls.from_quantized(
            conv,
            q,
            scale,
            weight_bits,
            asymmetric_qparams(*input_range, bits=in_bits),
            asymmetric_qparams(*output_range, bits=8),
            activation_bits,
        )

    @classmethod
    def from_quantized(
        cls,
        conv: torch.nn.Conv1d | torch.nn.Conv2d,
        weight_q: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_bits: int,
        input_qparams: tuple[torch.Tensor, torch.Tensor],
        output_qparams: tuple[torch.Tensor, torch.Tensor],
        activation_bits: int = 8,
    ) -> QuantizedConv:
        """Build from integers already chosen; geometry and bias are taken from ``conv``."""
        padding = conv.padding
        if isinstance(padding, str):  # "valid": convertible() lets no other string through
            padding = (0,) * (conv.weight.dim() - 2)
        layer = cls(
            tuple(conv.weight.shape),
            tuple(conv.stride),
            tuple(padding),
            tuple(conv.dilation),
            conv.groups,
            weight_bits,
            activation_bits,
        )
        q = weight_q.to(torch.int8)
        layer.weight_q = pack_bits(q, weight_bits) if weight_bits < 8 else q.flatten().clone()
        layer.weight_scale = weight_scale.detach().float().clone()
        if conv.bias is not None:
            layer.bias = conv.bias.detach().float().clone()
        layer.input_scale = input_qparams[0].detach().float().reshape(()).clone()
        layer.input_zero_point = input_qparams[1].reshape(()).to(torch.uint8)
        layer.output_scale = output_qparams[0].detach().float().reshape(()).clone()
        layer.output_zero_point = output_qparams[1].reshape(()).to(torch.uint8)
        return layer

    def int_weight(self) -> torch.Tensor:
        """The weight integers as an int8 tensor of the conv's weight shape."""
        if self.weight_bits < 8:
            return unpack_bits(self.weight_q, self.weight_bits, self.weight_shape)
        return self.weight_q.reshape(self.weight_shape)

    def input_clamp(self) -> tuple[float, float] | None:
        """The float range of ``activation_bits``-wide inputs, or None at 8 bits."""
        if self.activation_bits >= 8:
            return None
        scale, zp = float(self.input_scale), int(self.input_zero_point)
        return -zp * scale, (2**self.activation_bits - 1 - zp) * scale

    def _prepacked(self) -> Any:
        packed = _PREPACKED.get(self)
        if packed is None:
            qweight = torch._make_per_channel_quantized_tensor(
                self.int_weight(),
                self.weight_scale.double(),
                torch.zeros(self.out_channels, dtype=torch.long),
                0,
            )
            prepack = (
                torch.ops.quantized.conv1d_prepack
                if self.dims == 1
                else torch.ops.quantized.conv2d_prepack
            )
            packed = prepack(
                qweight, self.bias, list(self.stride), list(self.padding), list(self.dilation),
                self.groups,
            )  # fmt: skip
            _PREPACKED[self] = packed
        return packed

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        _PREPACKED.pop(self, None)
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bounds = self.input_clamp()
        if bounds is not None:
            x = torch.clamp(x, *bounds)
        if torch.onnx.is_in_onnx_export():
            w = torch.from_numpy(self.int_weight().numpy().copy())
            # int32 bias on the scale of input x weight, as onnxruntime's QDQ Conv expects
            bias_scale = (self.input_scale * self.weight_scale).detach()
            bias_q = torch.round(self.bias / bias_scale).to(torch.int32).detach()
            export = _qdq_conv_export(self.stride, self.padding, self.dilation, self.groups)
            return export.apply(
                x,
                w,
                self.weight_scale,
                bias_q,
                bias_scale,
                self.input_scale,
                self.input_zero_point,
                self.output_scale,
                self.output_zero_point,
            )
        xq = torch.quantize_per_tensor(
            x, float(self.input_scale), int(self.input_zero_point), torch.quint8
        )
        conv = torch.ops.quantized.conv1d if self.dims == 1 else torch.ops.quantized.conv2d
        yq = conv(xq, self._prepacked(), float(self.output_scale), int(self.output_zero_point))
        return yq.dequantize()

    def extra_repr(self) -> str:
        return (
            f"weight={list(self.weight_shape)}, stride={self.stride}, padding={self.padding}, "
            f"groups={self.groups}, w{self.weight_bits}a{self.activation_bits} static"
        )


@functools.cache
def _qdq_conv_export(
    stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...], groups: int
) -> type[torch.autograd.Function]:
    """The export Function of one conv geometry (the TorchScript exporter traces tensor
    arguments only, so the geometry is part of the class, not of the call)."""

    class _QdqConvExport(torch.autograd.Function):
        """Only used while exporting: the QDQ pattern onnxruntime fuses to ``QLinearConv``."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, *args: torch.Tensor) -> Any:
            # The traced value is irrelevant to the graph; shape and dtype must be right.
            conv = torch.nn.functional.conv1d if w.dim() == 3 else torch.nn.functional.conv2d
            return conv(x, w.float(), None, stride, padding, dilation, groups)

        @staticmethod
        def symbolic(  # the legacy exporter's hook
            g: Any,
            x: Any,
            w: Any,
            w_scale: Any,
            bias_q: Any,
            bias_scale: Any,
            in_scale: Any,
            in_zp: Any,
            out_scale: Any,
            out_zp: Any,
        ) -> Any:
            w_zp = g.op("Constant", value_t=torch.zeros(1, dtype=torch.int8))
            w_zp = g.op("Expand", w_zp, g.op("Shape", w_scale))
            b_zp = g.op("Constant", value_t=torch.zeros(1, dtype=torch.int32))
            b_zp = g.op("Expand", b_zp, g.op("Shape", bias_scale))
            xq = g.op("QuantizeLinear", x, in_scale, in_zp)
            xdq = g.op("DequantizeLinear", xq, in_scale, in_zp)
            wdq = g.op("DequantizeLinear", w, w_scale, w_zp, axis_i=0)
            bias = g.op("DequantizeLinear", bias_q, bias_scale, b_zp, axis_i=0)
            y = g.op(
                "Conv",
                xdq,
                wdq,
                bias,
                strides_i=list(stride),
                pads_i=list(padding) * 2,
                dilations_i=list(dilation),
                group_i=groups,
            )
            yq = g.op("QuantizeLinear", y, out_scale, out_zp)
            return g.op("DequantizeLinear", yq, out_scale, out_zp)

    return _QdqConvExport
