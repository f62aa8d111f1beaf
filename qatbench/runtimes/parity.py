"""Does the exported graph compute what the torch model computes? A tolerance per model.

``onnx_parity_max_abs`` is the largest absolute difference between onnxruntime's and
torch's outputs on the evaluation batch. Whether that is agreement depends on the model:

- When the model's output comes straight out of a layer with a static integer output
  (``output_scale``: ptq, qat, smoothquant), both runtimes produce integers on the same
  grid and may differ where a value sits on a rounding boundary: the tolerance is **one
  output quantization step** (that scale), plus float slack.
- Otherwise the tolerance is **relative**: ``RTOL`` (1%) of the largest absolute torch
  output. That covers what legitimately differs between two correct implementations
  here: summation order, torch's weight-only kernels rounding activations to bfloat16
  (about 2^-9 relative per element) where onnxruntime's MatMulNBits keeps fp32, and fp16
  graphs where onnxruntime inserts casts around operators without fp16 kernels.

Anything beyond is a broken export (a wrong layout, a missing zero point, a scale applied
twice), and is flagged with ``onnx_parity_ok`` = 0.0 and a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RTOL = 1e-2
SLACK = 1e-6  # float noise on top of one step, relative to the largest |output|


@dataclass(frozen=True)
class Parity:
    """The comparison of one model's two runtimes."""

    max_abs: float
    tolerance: float
    basis: str  # "output_step" or "relative"

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


def output_step(model: torch.nn.Module, x: torch.Tensor) -> float | None:
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
            result = model(x)
    finally:
        for handle in handles:
            handle.remove()
    for layer, out in reversed(outputs):
        if out is result:
            return float(layer.output_scale)  # type: ignore[arg-type]  # checked above
    return None


def compare(torch_out: torch.Tensor, ort_out: torch.Tensor, step: float | None) -> Parity:
    """``onnx_parity_max_abs`` and its tolerance (see the module docstring)."""
    max_abs = float((torch_out.float() - ort_out.float()).abs().max())
    scale = float(torch_out.abs().max())
    if step is not None:
        return Parity(max_abs, step + SLACK * scale, "output_step")
    return Parity(max_abs, RTOL * scale, "relative")
