"""A Linear layer with int8 weights whose activations are quantized on every call.

Weights: symmetric per-output-channel int8, quantized once. Activations: asymmetric uint8,
scale and zero point chosen per call from the batch's own range, so no calibration is
needed and no activation range can be stale.

Eager execution runs fbgemm's dynamic integer GEMM (``quantized::linear_dynamic``) on
weights prepacked once. The ONNX graph is ``DynamicQuantizeLinear`` + ``MatMulInteger``,
then a cast and the product of the two scales (plus the bias): the pattern onnxruntime
fuses into ``DynamicQuantizeMatMul`` (or ``MatMulIntegerToFloat``), its integer kernel.

x86 CPUs without VNNI multiply u8 x s8 bytes pairwise into saturating int16 sums (fbgemm
and onnxruntime's MLAS alike): 255 x 127 x 2 overflows. ``reduce_range`` therefore keeps
the weights on 7 bits (``[-63, 63]``), which is safe with full 8-bit activations in both
runtimes, at a small cost in precision.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

from qatbench.quant.affine import quantize_weight_per_channel

# PyTorch announces the deprecation of quantized tensors on every call
# (docs/methods-and-models.md, "Known limits").
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)

_PREPACKED: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()


class DynamicQuantizedLinear(torch.nn.Module):
    """Integer replacement of ``nn.Linear`` with per-call activation quantization."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, in_features: int, out_features: int, weight_bits: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features, self.weight_bits = (
            in_features,
            out_features,
            weight_bits,
        )
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))

    @classmethod
    def from_float(
        cls, linear: torch.nn.Linear, reduce_range: bool = True
    ) -> DynamicQuantizedLinear:
        """Quantize ``linear``'s weights to 8 bits (7 with ``reduce_range``)."""
        bits = 7 if reduce_range else 8
        layer = cls(linear.in_features, linear.out_features, bits)
        layer.weight_q, layer.weight_scale = quantize_weight_per_channel(linear.weight, bits)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def _prepacked(self) -> Any:
        packed = _PREPACKED.get(self)
        if packed is None:
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight_q,
                self.weight_scale.double(),
                torch.zeros(self.out_features, dtype=torch.long),
                0,
            )
            packed = _PREPACKED[self] = torch.ops.quantized.linear_prepack(qweight, self.bias)
        return packed

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        _PREPACKED.pop(self, None)  # new integers: prepack again on the next call
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            w_t = torch.from_numpy(self.weight_q.numpy().T.copy())
            out = _DynamicLinearExport.apply(x, w_t, self.weight_scale, self.bias)
            assert isinstance(out, torch.Tensor)  # autograd.Function.apply is typed loosely
            return out
        # Full 8-bit activations: with 7-bit weights the int16 pair sums cannot saturate.
        return torch.ops.quantized.linear_dynamic(x, self._prepacked(), False)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, "
            f"w{self.weight_bits} per-channel, a8 dynamic"
        )


class _DynamicLinearExport(torch.autograd.Function):
    """Only used while exporting: emits the pattern onnxruntime fuses to integer kernels."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_t: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((*x.shape[:-1], w_t.shape[1]))

    @staticmethod
    def symbolic(g: Any, x: Any, w_t: Any, w_scale: Any, bias: Any) -> Any:
        w_zp = g.op("Constant", value_t=torch.zeros(1, dtype=torch.int8))
        w_zp = g.op("Expand", w_zp, g.op("Shape", w_scale))
        xq, x_scale, x_zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", xq, w_t, x_zp, w_zp)
        y = g.op("Cast", acc, to_i=1)  # FLOAT
        y = g.op("Mul", y, g.op("Mul", x_scale, w_scale))
        return g.op("Add", y, bias)
