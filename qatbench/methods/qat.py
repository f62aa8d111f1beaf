"""Quantization-aware training from the fp32 weights, converted to real integers.

``prepare`` folds BatchNorm into the convolution before it and wraps every ``nn.Linear``,
``nn.Conv1d`` and ``nn.Conv2d`` in a fake-quant layer (see
:mod:`qatbench.quant.fake_quant`); ``calibrate`` initialises the activation ranges with
the runner's forward loop; ``train`` fine-tunes weights (and, with ``estimator: lsq``, every
quantizer's scale) through ``train_loop(model, optimizer, steps)``, the runner's
cross-entropy loop; ``convert`` replaces each layer with a
:class:`~qatbench.quant.quantized_linear.QuantizedLinear` (or
:class:`~qatbench.quant.quantized_conv.QuantizedConv`) holding the very integers and
scales the training saw, so torch runs fbgemm's integer GEMM and the exported QDQ graph
runs onnxruntime's integer kernels.

Below 8 bits, activations are quantized onto ``2**bits`` levels and weights onto
``[-(2**(bits-1)-1), 2**(bits-1)-1]``; both are held in bytes and fed to the same 8-bit
integer kernels (sub-byte weights are packed in the artifact), so the arithmetic is real
and the accuracy is that of the narrow grid. The speed is that of 8-bit kernels.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from qatbench.errors import PluginError
from qatbench.methods.base import LINEAR_AND_CONV, Capabilities, TrainLoop
from qatbench.methods.fake_quant import (
    FAKE_ACTIVATION_BITS,
    FAKE_WEIGHT_BITS,
    FakeQuantConfig,
    FakeQuantMethod,
)
from qatbench.quant.fake_quant import FakeQuantLinear, fake_quant_layers
from qatbench.quant.quantized_conv import QuantizedConv
from qatbench.quant.quantized_linear import QuantizedLinear


class QatMethod(FakeQuantMethod):
    """Fake-quant training (STE or LSQ), then integer weights and activations."""

    name = "qat"
    simulated = False
    capabilities = Capabilities(
        weight_bits=FAKE_WEIGHT_BITS,
        activation_bits=FAKE_ACTIVATION_BITS,
        needs_calibration=True,
        needs_training=True,
        layer_types=LINEAR_AND_CONV,
    )

    class Config(FakeQuantConfig):
        estimator: Literal["ste", "lsq"] = Field(
            "lsq", description="gradient through rounding: ste, or lsq with learned scales"
        )
        steps: int = Field(200, ge=1, le=1_000_000, description="optimisation steps")
        epochs: float | None = Field(
            None,
            gt=0,
            le=1000,
            description="passes over the training data; overrides steps when the runner's "
            "train loop says how many steps an epoch has",
        )
        lr: float = Field(
            3e-4, gt=0, le=10, description="learning rate (fine-tuning from trained weights)"
        )
        optimizer: Literal["adam", "sgd"] = "adam"
        momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum")
        weight_decay: float = Field(0.0, ge=0, le=1)

    def _steps(self, train_loop: TrainLoop) -> int:
        if self.config.epochs is None:
            return int(self.config.steps)
        per_epoch = getattr(train_loop, "steps_per_epoch", None)
        if not isinstance(per_epoch, int) or per_epoch < 1:
            raise PluginError(
                f"{self.name}: option epochs needs a train loop that tells its steps_per_epoch; "
                "give steps instead"
            )
        return max(1, math.ceil(self.config.epochs * per_epoch))

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise PluginError(f"{self.name}: the model has no trainable parameters")
        cfg = self.config
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def train(self, model: torch.nn.Module, train_loop: TrainLoop) -> torch.nn.Module:
        train_loop(model, self._optimizer(model), self._steps(train_loop))
        return model.eval()

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        layers = fake_quant_layers(model)
        if not layers:
            raise PluginError(f"{self.name}: the model has no Linear layer to quantize")
        for name, layer in layers:
            model.set_submodule(name, to_integer(layer))
        return model.eval()


def to_integer(layer: FakeQuantLinear) -> QuantizedLinear | QuantizedConv:
    """The integer layer computing what the trained fake-quant ``layer`` simulates."""
    if layer.input_quant is None or layer.output_quant is None:
        raise PluginError("qat: weight-only fake quantization has no integer conversion")
    if layer.input_quant.observing:
        raise PluginError("qat: activation ranges were never calibrated")
    q, scale = layer.weight_quant.quantize(layer.linear.weight)
    if isinstance(layer.linear, torch.nn.Conv1d | torch.nn.Conv2d):
        return QuantizedConv.from_quantized(
            layer.linear,
            q,
            scale,
            layer.weight_bits,
            layer.input_quant.qparams(),
            layer.output_quant.qparams(),
            activation_bits=layer.input_quant.bits,
        )
    return QuantizedLinear.from_quantized(
        q,
        scale,
        layer.linear.bias,
        layer.weight_bits,
        layer.input_quant.qparams(),
        layer.output_quant.qparams(),
        activation_bits=layer.input_quant.bits,
    )
