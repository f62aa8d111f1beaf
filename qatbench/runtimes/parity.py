"""Does the exported graph compute what the torch model computes? A tolerance per model.

``onnx_parity_max_abs`` is the largest absolute difference between onnxruntime's and
torch's outputs on the evaluation batch. Whether that is agreement depends on the model:

- When the model's output comes straight out of a layer with a static integer output
  (``output_scale``: ptq, qat, smoothquant), both runtimes produce integers on the same
  grid and may differ where a value sits on a rounding boundary: the tolerance is **one
  output quantization step** (that scale) for a one-layer model. Every layer that
  requantizes its output can round one step the other way and pass it on (fbgemm and
  onnxruntime requantize with different float arithmetic), so a model with ``k`` such
  layers is allowed ``k`` output steps: measured here, the 4-layer MLP differs by 3 steps
  and the 6- and 10-layer transformers by 2; a wrong scale or layout is off by far more.
- Otherwise the tolerance is **relative**: ``RTOL`` (2%) of the largest absolute torch
  output. That covers what legitimately differs between two correct implementations
  here: summation order and fp16 graphs where onnxruntime inserts casts around operators
  without fp16 kernels. Weight-only layers are compared with their fp32 computation from
  the same integers (``fp32_kernels``), as torch's int8/int4 kernels round activations to
  bfloat16. onnxruntime's MatMulNBits keeps fp32 weights but quantizes each layer's input
  to int8 per block
  (accuracy level 4, what makes it fast). That rounding compounds through the layers like
  requantization does, so the relative tolerance is ``RTOL`` per weight-only layer: 9 layers
  of a small decoder differ by 0.40-0.52 on logits up to 12 (perplexity equal to 0.001),
  where a wrong scale or layout is off by a large fraction of the output.

In a model with two or more layers that round their activations as they run
(:func:`activation_quantizing_layers`: dynamic int8, static requantization), the relative
bound is not asked to be tighter than the quantization itself (the output-step bound is
exact and stays as it is; weight-only models keep the per-layer ``RTOL``): the tolerance is at least
the candidate's own largest error against fp32 (``quantization_error``, torch's quantized
model against the fp32 model on the same batch). Two correct implementations of one
quantized model round at different points (fbgemm multiplies by the reciprocal scale,
onnxruntime divides; one activation a step the other way), and in a deep model those flips
compound through every layer that quantizes its input on the fly or requantizes its output:
on all-MiniLM-L6-v2 (36 quantized Linears, outputs up to 1.07) ``dynamic`` differs between
the runtimes by 0.105 and ``ptq`` by 0.381, while each runtime's error against fp32 is 0.16-0.18
and 0.53, with the same SQNR against fp32 in both runtimes (17.78 and 17.80 dB; 8.04 and
8.05 dB): as accurate as each other, a different rounding, not a mismatch. An export that is
wrong (a scale applied twice, a transposed weight) lands beyond the quantization error of
a method worth measuring.

Anything beyond is a broken export (a wrong layout, a missing zero point, a scale applied
twice), and is flagged with ``onnx_parity_ok`` = 0.0 and a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qatbench.data.inputs import Batch, call

RTOL = 2e-2
SLACK = 1e-6  # float noise on top of one step, relative to the largest |output|


@dataclass(frozen=True)
class Parity:
    """The comparison of one model's two runtimes."""

    max_abs: float
    tolerance: float
    basis: str  # "output_step" or "relative"
    steps: int = 0  # output steps allowed (the requantizing layers), 0 when relative

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


def requantizing_layers(model: torch.nn.Module) -> int:
    """Layers with a static integer output (an ``output_scale`` buffer)."""
    return sum(isinstance(getattr(m, "output_scale", None), torch.Tensor) for m in model.modules())


def output_step(model: torch.nn.Module, x: Batch) -> float | None:
    """The quantization step of the model's output, if a layer with a static integer
    output (an ``output_scale`` buffer) returns the very tensor the model returns."""
    layers = [
        m for m in model.modules() if isinstance(getattr(m, "output_scale", None), torch.Tensor)
    ]
    if not layers:
        return None
    outputs: list[tuple[torch.nn.Module, object]] = []  # strong references: ids stay unique
    handles = [
        layer.register_forward_hook(lambda mod, _args, out: outputs.append((mod, out)))
        for layer in layers
    ]
    try:
        with torch.inference_mode():
            result = call(model, x)
    finally:
        for handle in handles:
            handle.remove()
    for layer, out in reversed(outputs):
        if out is result:
            return float(layer.output_scale)  # type: ignore[arg-type]  # checked above
    return None


def compare(
    torch_out: torch.Tensor,
    ort_out: torch.Tensor,
    step: float | None,
    steps: int = 1,
    quantizing_inputs: int = 0,
    quantization_error: float = 0.0,
) -> Parity:
    """``onnx_parity_max_abs`` and its tolerance: ``steps`` output steps of ``step``, or
    relative when ``step`` is None: ``RTOL`` of the largest output per layer whose input
    onnxruntime quantizes on the fly (``quantizing_inputs``, at least one), and then never
    under ``quantization_error``, the torch candidate's largest error against fp32 (see the
    module docstring). The output-step bound stays exact."""
    max_abs = float((torch_out.float() - ort_out.float()).abs().max())
    scale = float(torch_out.abs().max())
    if step is not None:
        steps = max(steps, 1)
        return Parity(max_abs, steps * step + SLACK * scale, "output_step", steps)
    relative = max(quantizing_inputs, 1) * RTOL * scale
    if quantization_error > relative:
        return Parity(max_abs, quantization_error, "quantization_error")
    return Parity(max_abs, relative, "relative")


def activation_quantizing_layers(model: torch.nn.Module) -> int:
    """Layers that round their activations as they run: a static integer output
    (``output_scale``) or an input quantized per call (dynamic int8). Where two or more
    follow each other, the runtimes' rounding differences compound and the relative
    tolerance is floored at the quantization error (see the module docstring)."""
    from qatbench.quant.dynamic_linear import DynamicQuantizedLinear

    dynamic = sum(isinstance(m, DynamicQuantizedLinear) for m in model.modules())
    return requantizing_layers(model) + dynamic


def weight_only_layers(model: torch.nn.Module) -> int:
    """Weight-only integer layers: onnxruntime's fused ``MatMulNBits`` quantizes their
    inputs to int8 per block (accuracy level 4), which torch's kernels do not."""
    from qatbench.quant.weight_only_linear import WeightOnlyLinear

    return sum(isinstance(m, WeightOnlyLinear) for m in model.modules())
