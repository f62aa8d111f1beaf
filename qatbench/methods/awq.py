"""AWQ weight-only quantization (``awq``): activation-aware scaling and clipping.

``calibrate`` records each planned Linear's inputs (at most ``max_rows`` rows, evenly
subsampled) while the runner's ``forward_loop`` runs, then searches every layer's
per-feature scales and clipping ranges (:func:`~qatbench.quant.awq.awq_quantize`). The
stored layer is the same :class:`~qatbench.quant.weight_only_linear.WeightOnlyLinear` as
``rtn`` and ``gptq`` produce, plus a per-input-feature ``input_scale`` (``1 / s``) applied
to the input on every call (an elementwise multiply; a ``Mul`` node in ONNX).

``clip`` is off by default: on the digits MLP (w4, group 16) it lowered every layer's own
output error, on calibration and evaluation data alike, yet raised the network's output
MSE from 0.063 to 0.150 (clipping shrinks weights toward zero, a bias that compounds
through the layers); per channel it helped slightly (0.090 to 0.086).
"""

from __future__ import annotations

import torch
from pydantic import Field

from qatbench.errors import PluginError
from qatbench.methods.base import (
    ALL_RUNTIMES,
    COMPILED,
    Capabilities,
    ForwardLoop,
    MethodConfig,
    QuantMethod,
)
from qatbench.methods.rtn import (
    WEIGHT_ONLY_BITS,
    WeightOnlyConfig,
    planned_layers,
    swap_planned_linears,
)
from qatbench.quant.affine import GroupQuantized
from qatbench.quant.awq import awq_quantize
from qatbench.quant.bitwidth import FP32, BitWidth
from qatbench.quant.weight_only_linear import WeightOnlyLinear


class _Rows:
    """A layer's input rows, thinned to every other row whenever more than 2x ``cap`` pile up."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.chunks: list[torch.Tensor] = []
        self.count = 0
        self.stride = 1

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()[:: self.stride].clone()
        self.chunks.append(rows)
        self.count += rows.shape[0]
        if self.count > 2 * self.cap:
            self.chunks = [torch.cat(self.chunks)[::2].clone()]
            self.count = self.chunks[0].shape[0]
            self.stride *= 2

    def rows(self) -> torch.Tensor:
        rows = torch.cat(self.chunks)
        if rows.shape[0] > self.cap:
            rows = rows[torch.linspace(0, rows.shape[0] - 1, self.cap).long()]
        return rows


class AwqMethod(QuantMethod):
    """AWQ (``w8``, ``w4``, ``w3``, ``w2``); needs calibration data."""

    name = "awq"
    # calibrate reads the weights and convert builds new layers: no tensor is written
    capabilities = Capabilities(
        weight_bits=WEIGHT_ONLY_BITS,
        weight_only=True,
        needs_calibration=True,
        runtimes=ALL_RUNTIMES | COMPILED,
        keeps_weights=True,
        reusable_model=True,
    )

    class Config(WeightOnlyConfig):
        grid: int = Field(20, ge=1, le=100, description="scale exponents tried in [0, 1)")
        clip: bool = Field(
            False, description="search per-group clipping of the weight range (llm-awq's)"
        )
        max_rows: int = Field(
            2048, ge=16, le=1_000_000, description="calibration input rows kept per layer"
        )

    def __init__(self, config: MethodConfig | None = None, bits: BitWidth = FP32) -> None:
        super().__init__(config, bits)
        self._results: dict[str, tuple[GroupQuantized, torch.Tensor]] = {}

    def calibrate(self, model: torch.nn.Module, forward_loop: ForwardLoop) -> torch.nn.Module:
        config = self.config
        plan = planned_layers(model, config, self.bits.weight, self.name)
        inputs = {name: _Rows(config.max_rows) for name in plan}
        handles = [
            model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, rows=inputs[name]: rows.add(args[0])
            )
            for name in plan
        ]
        try:
            with torch.no_grad():
                forward_loop(model)
        finally:
            for handle in handles:
                handle.remove()
        for name, bits in plan.items():
            if inputs[name].count == 0:
                raise PluginError(f"awq: layer {name!r} saw no calibration data")
            layer = model.get_submodule(name)
            assert isinstance(layer, torch.nn.Linear)  # planned layers are Linear layers
            self._results[name] = awq_quantize(
                layer.weight,
                inputs[name].rows(),
                bits,
                config.group_size,
                config.symmetric,
                config.grid,
                config.clip,
            )
        return model

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        plan = planned_layers(model, self.config, self.bits.weight, self.name)
        missing = [name for name in plan if name not in self._results]
        if missing:
            raise PluginError(f"awq: layer {missing[0]!r} was not calibrated before convert")

        def build(name: str, layer: torch.nn.Linear, _bits: int) -> WeightOnlyLinear:
            quantized, input_scale = self._results[name]
            return WeightOnlyLinear.from_quantized(quantized, layer.bias, input_scale)

        return swap_planned_linears(model, plan, build)
