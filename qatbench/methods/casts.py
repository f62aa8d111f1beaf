"""Plain floating-point casts: ``bf16`` and ``fp16``, the baseline integer methods must beat.

The whole model is cast (weights, buffers and compute); the input is cast on the way in and
the output back to fp32 on the way out, so callers see the fp32 model's interface. The
artifact is half the size of fp32, honestly: every tensor is stored in 16 bits.

Runtimes: ``fp16`` runs on torch and on onnxruntime (its CPU provider runs half-precision
graphs, inserting casts around operators without fp16 kernels); ``bf16`` runs on torch
only, because the CPU provider has no bfloat16 kernels for ``Gemm``/``MatMul``. Whether a
cast is fast depends on the CPU: with AMX or AVX512-BF16 a bf16 GEMM beats fp32; with AVX2
alone torch emulates it and it is several times slower (see docs/cpu-results.md).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qatbench.methods.base import (
    ALL_RUNTIMES,
    COMPILED,
    LINEAR_AND_CONV,
    Capabilities,
    QuantMethod,
)

HALF_BITS = frozenset({16})


class CastModel(torch.nn.Module):
    """``model`` held in ``dtype``; takes and returns fp32 tensors."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.model = model.to(dtype)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        return self.model(*cast).float()

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


class _CastMethod(QuantMethod):
    """Casts the model to ``dtype`` in ``convert``; bit-width ``w16a16``."""

    dtype: ClassVar[torch.dtype]

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        return CastModel(model, self.dtype).eval()


class Bf16Method(_CastMethod):
    """bfloat16 weights and compute (torch only: onnxruntime's CPU provider has no bf16)."""

    name = "bf16"
    dtype = torch.bfloat16
    capabilities = Capabilities(
        weight_bits=HALF_BITS,
        activation_bits=HALF_BITS,
        runtimes=frozenset({"torch", "torch_compile"}),
        layer_types=LINEAR_AND_CONV,  # the cast covers every layer
    )


class Fp16Method(_CastMethod):
    """IEEE half-precision weights and compute, on torch and onnxruntime."""

    name = "fp16"
    dtype = torch.float16
    capabilities = Capabilities(
        weight_bits=HALF_BITS,
        activation_bits=HALF_BITS,
        runtimes=ALL_RUNTIMES | COMPILED,
        layer_types=LINEAR_AND_CONV,  # the cast covers every layer
    )
