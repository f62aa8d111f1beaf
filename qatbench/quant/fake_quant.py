"""Fake quantization for simulation and quantization-aware training.

Two estimators of the gradient through ``round``:

- **STE** (straight-through, :class:`FakeQuantizeSTE`): the quantize-dequantize is the
  identity for the gradient inside the representable range and zero outside it (where the
  clamp saturates). Scales come from observed ranges, not from gradients.
- **LSQ** (learned step size, Esser et al. 2020, :func:`lsq_fake_quantize`): the scale is a
  parameter; rounding passes gradients straight through and the clamp does not, so the
  scale receives the paper's gradient, damped by ``1 / sqrt(numel * qmax)``.

:class:`FakeQuantLinear` wraps an ``nn.Linear`` with a weight quantizer (symmetric,
per output channel), an input quantizer (asymmetric, per tensor, ``activation_bits`` wide;
``None`` leaves activations in floating point) and an 8-bit output quantizer, which is
exactly what :class:`~qatbench.quant.quantized_linear.QuantizedLinear` computes, so a
trained model converts to real integers without a change in its outputs beyond float
rounding. Every op is a plain float op, so an exported fake-quant graph runs in float on
onnxruntime: simulated, and honestly so.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch.nn import functional as F

from qatbench.quant.affine import EPS, asymmetric_qparams, int_range

Estimator = Literal["ste", "lsq"]
EMA_MOMENTUM = 0.01  # how fast STE activation ranges follow the data while training


def _broadcast(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


class FakeQuantizeSTE(torch.autograd.Function):
    """``dequantize(quantize(x))`` with the straight-through estimator.

    The gradient of ``x`` is passed through where ``round(x / scale) + zero_point`` lies in
    ``[qmin, qmax]`` and is zero where the clamp saturates; ``scale`` and ``zero_point`` get
    none (they are statistics, not parameters).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qmin: int,
        qmax: int,
        axis: int | None = None,
    ) -> torch.Tensor:
        s = _broadcast(scale, x, axis)
        zp = _broadcast(zero_point.to(x.dtype), x, axis)
        q = torch.round(x / s) + zp
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (q.clamp(qmin, qmax) - zp) * s

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grads[0] * inside, None, None, None, None, None


def ste_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Apply :class:`FakeQuantizeSTE`; plain float ops when no gradient is wanted."""
    if torch.onnx.is_in_onnx_export() or not (torch.is_grad_enabled() and x.requires_grad):
        s = _broadcast(scale, x, axis)
        zp = _broadcast(zero_point.to(x.dtype), x, axis)
        return (torch.clamp(torch.round(x / s) + zp, qmin, qmax) - zp) * s
    out = FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, axis)
    assert isinstance(out, torch.Tensor)  # autograd.Function.apply is typed loosely
    return out


def _round_pass(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return (torch.round(x) - x).detach() + x


def _grad_scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` forward, gradient multiplied by ``factor`` backward."""
    return (t - t * factor).detach() + t * factor


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """LSQ quantize-dequantize: gradients reach ``x`` (inside the range) and ``scale``."""
    per_scale = x.numel() // max(scale.numel(), 1)
    factor = 1.0 / math.sqrt(max(per_scale, 1) * max(qmax, 1))
    s = _broadcast(_grad_scaled(scale, factor).clamp(min=EPS), x, axis)
    zp = _broadcast(zero_point.to(x.dtype), x, axis)
    v = torch.clamp(x / s + zp, qmin, qmax)
    return (_round_pass(v) - zp) * s


def mse_weight_scale(weight: torch.Tensor, bits: int, grid: int = 20) -> torch.Tensor:
    """Per-output-channel symmetric scale whose clipping minimises the weights' MSE.

    Searches clipping ratios in ``(0, 1]`` of each channel's absmax; at 8 bits the answer
    is nearly absmax, at 2-3 bits clipping the outliers pays.
    """
    w = weight.detach().reshape(weight.shape[0], -1).float()
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=1).clamp(min=EPS)
    best = absmax / qmax
    best_err = torch.full_like(absmax, float("inf"))
    for i in range(grid):
        scale = absmax * (1.0 - i / (grid + 1)) / qmax
        q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)
        err = (q * scale[:, None] - w).pow(2).sum(dim=1)
        better = err < best_err
        best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


class WeightFakeQuant(torch.nn.Module):
    """Symmetric per-output-channel weights (``[-qmax, qmax]``, zero point 0).

    STE: the scale follows the weights (absmax, or the MSE-optimal clipping with
    ``clip="mse"``) on every call. LSQ: the scale is a parameter, initialised on the first
    call with the MSE-optimal clipping of the weights it sees.
    """

    initialised: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, channels: int, bits: int, estimator: Estimator, clip: str = "absmax"):
        super().__init__()
        self.bits, self.estimator, self.clip = bits, estimator, clip
        self.qmax = 2 ** (bits - 1) - 1
        self.scale = torch.nn.Parameter(torch.ones(channels), requires_grad=estimator == "lsq")
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32))

    def current_scale(self, weight: torch.Tensor) -> torch.Tensor:
        if self.estimator == "lsq":
            if not bool(self.initialised):
                with torch.no_grad():
                    self.scale.copy_(mse_weight_scale(weight, self.bits))
                    self.initialised.fill_(True)
            return self.scale
        if self.clip == "mse":
            return mse_weight_scale(weight, self.bits)
        absmax = weight.detach().abs().amax(dim=tuple(range(1, weight.dim())))
        return (absmax / self.qmax).clamp(min=EPS)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.current_scale(weight)
        fake = lsq_fake_quantize if self.estimator == "lsq" else ste_fake_quantize
        return fake(weight, scale, self.zero_point, -self.qmax, self.qmax, 0)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The integers (int8 holding ``bits``-bit values) and per-channel scales."""
        with torch.no_grad():
            scale = self.current_scale(weight).detach().float().clamp(min=EPS)
            per_channel = scale.reshape(-1, *([1] * (weight.dim() - 1)))
            q = torch.clamp(torch.round(weight / per_channel), -self.qmax, self.qmax)
        return q.to(torch.int8), scale.clone()

    def extra_repr(self) -> str:
        return f"w{self.bits} {self.estimator} per-channel"


class ActFakeQuant(torch.nn.Module):
    """Asymmetric unsigned per-tensor activations, ``bits`` wide.

    While ``observing`` it records the min/max and passes values through unchanged (the
    calibration pass). Afterwards it quantizes: STE with the observed range (followed by an
    exponential moving average while training), or LSQ with a learned scale initialised
    from the range and a zero point fixed at calibration.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, bits: int, estimator: Estimator) -> None:
        super().__init__()
        self.bits, self.estimator = bits, estimator
        self.qmin, self.qmax = int_range(bits, signed=False)
        self.observing = True
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.scale = torch.nn.Parameter(torch.tensor(1.0), requires_grad=estimator == "lsq")
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    @property
    def seen(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, x.detach().min().float())
        self.max_val = torch.maximum(self.max_val, x.detach().max().float())

    @torch.no_grad()
    def freeze(self) -> None:
        """End calibration: derive scale and zero point from the observed range."""
        if not self.seen:
            raise ValueError("activation quantizer saw no data: run the calibration loop first")
        self.observing = False
        self._set_qparams()

    @torch.no_grad()
    def _set_qparams(self) -> None:
        scale, zp = asymmetric_qparams(self.min_val, self.max_val, self.bits)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp.to(torch.int32))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) as a deployed integer layer uses them."""
        return self.scale.detach().float().clamp(min=EPS).clone(), self.zero_point.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        if self.estimator == "lsq":
            return lsq_fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax)
        if self.training:
            with torch.no_grad():
                lo, hi = x.detach().min().float(), x.detach().max().float()
                self.min_val.lerp_(lo, EMA_MOMENTUM)
                self.max_val.lerp_(hi, EMA_MOMENTUM)
                self._set_qparams()
        return ste_fake_quantize(x, self.scale.detach(), self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"a{self.bits} {self.estimator} per-tensor"


class FakeQuantLinear(torch.nn.Module):
    """``nn.Linear`` with fake-quantized weights, input and output (see module docstring).

    ``activation_bits=None`` quantizes the weights only. ``output_bits`` matches the 8-bit
    requantization of the integer layer; ``None`` leaves the output in floating point.
    ``linear`` may also be an ``nn.Conv1d``/``nn.Conv2d`` (BatchNorm folded into it first):
    the same quantizers, per output channel, around the convolution.
    """

    def __init__(
        self,
        linear: torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d,
        weight_bits: int,
        activation_bits: int | None,
        estimator: Estimator = "ste",
        output_bits: int | None = 8,
        weight_clip: str = "absmax",
    ) -> None:
        super().__init__()
        self.linear = linear
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.weight_quant = WeightFakeQuant(
            linear.weight.shape[0], weight_bits, estimator, clip=weight_clip
        )
        self.input_quant = (
            ActFakeQuant(activation_bits, estimator) if activation_bits is not None else None
        )
        self.output_quant = (
            ActFakeQuant(output_bits, estimator)
            if activation_bits is not None and output_bits is not None
            else None
        )

    def activation_quantizers(self) -> list[ActFakeQuant]:
        return [q for q in (self.input_quant, self.output_quant) if q is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        weight = self.weight_quant(self.linear.weight)
        if isinstance(self.linear, torch.nn.Conv1d | torch.nn.Conv2d):
            y = self.linear._conv_forward(x, weight, self.linear.bias)
        else:
            y = F.linear(x, weight, self.linear.bias)
        if self.output_quant is not None:
            y = self.output_quant(y)
        return y


def wrap_linears(
    model: torch.nn.Module,
    plan: dict[str, int],
    activation_bits: int | None,
    estimator: Estimator = "ste",
    weight_clip: str = "absmax",
) -> torch.nn.Module:
    """Replace each ``nn.Linear`` (or ``nn.Conv1d``/``nn.Conv2d``) named in ``plan``
    (name -> weight bits) with a FakeQuantLinear of those weight bits."""
    for name, bits in plan.items():
        linear = model.get_submodule(name)
        assert isinstance(linear, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d)
        model.set_submodule(
            name,
            FakeQuantLinear(linear, bits, activation_bits, estimator, weight_clip=weight_clip),
        )
    return model


def fake_quant_layers(model: torch.nn.Module) -> list[tuple[str, FakeQuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


def calibrate_activations(model: torch.nn.Module, forward_loop: Any) -> None:
    """Observe activation ranges with ``forward_loop(model)``, then freeze them."""
    quantizers = [q for _, layer in fake_quant_layers(model) for q in layer.activation_quantizers()]
    for q in quantizers:
        q.observing = True
    with torch.no_grad():
        forward_loop(model)
    for q in quantizers:
        q.freeze()
