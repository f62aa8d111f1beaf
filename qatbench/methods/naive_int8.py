"""``naive_int8``: int8 weights dequantized on every forward, the reference without kernels.

Every ``nn.Linear`` becomes a :class:`~qatbench.quant.naive_linear.NaiveInt8Linear`:
symmetric per-channel int8 weights (a quarter of fp32 on disk) that each call turns back
into an fp32 weight before an fp32 GEMM. Compared with ``rtn w8`` (the same integers on
``int8pack_mm``) or ``ptq``/``dynamic`` (fbgemm's integer GEMM) it shows what a benchmark
would report for a quantized model that never reaches an integer kernel: smaller, not
faster (slower, in fact). ``simulated`` is True: the arithmetic is fp32.

Runs in torch, eager and compiled (inductor fuses the dequantization into one pass but
still does it per call). Not offered on onnxruntime, whose graph optimiser would fold the
dequantization into an fp32 weight at load time and so measure plain fp32.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qatbench.methods.base import Capabilities, QuantMethod
from qatbench.methods.layer_selection import LayerSelection, replace_linears
from qatbench.quant.naive_linear import NaiveInt8Linear


class NaiveInt8Method(QuantMethod):
    """Per-channel int8 weights, dequantized to fp32 per call (``w8``)."""

    name = "naive_int8"
    capabilities = Capabilities(
        weight_bits=frozenset({8}),
        weight_only=True,
        runtimes=frozenset({"torch", "torch_compile"}),
    )
    simulated = True

    class Config(LayerSelection):
        override_bits: ClassVar[frozenset[int]] = frozenset({8})

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        return replace_linears(
            model, self.config, self.bits.weight, self.name, NaiveInt8Linear.from_float
        )
