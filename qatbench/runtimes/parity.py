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
) -> Parity:
    """``onnx_parity_max_abs`` and its tolerance: ``steps`` output steps of ``step``, or
    relative when ``step`` is None: ``RTOL`` of the largest output per layer whose input
    onnxruntime quantizes on the fly (``quantizing_inputs``, at least one; see the module
    docstring)."""
    max_abs = float((torch_out.float() - ort_out.float()).abs().max())
    scale = float(torch_out.abs().max())
    if step is not None:
        steps = max(steps, 1)
        return Parity(max_abs, steps * step + SLACK * scale, "output_step", steps)
    layers = max(quantizing_inputs, 1)
    return Parity(max_abs, layers * RTOL * scale, "relative")


def weight_only_layers(model: torch.nn.Module) -> int:
    """Weight-only integer layers: onnxruntime's fused ``MatMulNBits`` quantizes their
    inputs to int8 per block (accuracy level 4), which torch's kernels do not."""
    from qatbench.quant.weight_only_linear import WeightOnlyLinear

    return sum(isinstance(m, WeightOnlyLinear) for m in model.modules())
