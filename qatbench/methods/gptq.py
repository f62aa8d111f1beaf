"""GPTQ weight-only quantization (``gptq``): Hessian-based error correction from calibration.

``calibrate`` records ``H = 2 X^T X`` of every planned Linear's inputs with forward
pre-hooks while the runner's ``forward_loop`` runs, and quantizes with
:func:`~qatbench.quant.gptq.gptq_quantize`. With ``sequential`` (the default) it goes
layer by layer in module order: each layer's Hessian is taken with the layers before it
already quantized (their weights replaced by the dequantized integers), one calibration
pass per layer, as GPTQ does for a stack of blocks. ``convert`` stores the result exactly
as ``rtn`` does (:class:`~qatbench.quant.weight_only_linear.WeightOnlyLinear`), so the two
differ only in which integers they choose.

Between the two, an fp32 layer's integers live in its dequantized weight alone: they are
read back from it at ``convert`` with the layer's scales, and checked to dequantize to it
exactly (``(q - z) * s`` divided by ``s`` rounds back to ``q - z``). Keeping them as well,
one byte per weight, had been a quarter of the fp32 weights more at calibration's peak.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from qatbench.quant.affine import GroupQuantized, quantize_with_qparams
from qatbench.quant.bitwidth import FP32, BitWidth
from qatbench.quant.gptq import HessianAccumulator, gptq_quantize
from qatbench.quant.weight_only_linear import WeightOnlyLinear


class _AllSeen(Exception):
    """Raised inside a calibration forward pass once it has fed every layer it is for."""


class GptqMethod(QuantMethod):
    """GPTQ (``w8``, ``w4``, ``w3``, ``w2``); needs calibration data."""

    name = "gptq"
    capabilities = Capabilities(
        weight_bits=WEIGHT_ONLY_BITS,
        weight_only=True,
        needs_calibration=True,
        runtimes=ALL_RUNTIMES | COMPILED,
        reusable_model=True,
    )

    class Config(WeightOnlyConfig):
        damp: float = Field(
            0.01, gt=0, le=1, description="fraction of the mean Hessian diagonal added to it"
        )
        act_order: bool = Field(
            False, description="quantize columns in decreasing Hessian diagonal order"
        )
        block_size: int = Field(128, ge=1, description="columns per lazy batch update")
        sequential: bool = Field(
            True, description="Hessians taken through the already quantized earlier layers"
        )

    def __init__(self, config: MethodConfig | None = None, bits: BitWidth = FP32) -> None:
        super().__init__(config, bits)
        # per layer: its integers, or (fp32 layers) only their grid: see the module's doc
        self._results: dict[str, GroupQuantized | _Grid] = {}

    def calibrate(self, model: torch.nn.Module, forward_loop: ForwardLoop) -> torch.nn.Module:
        plan = planned_layers(model, self.config, self.bits.weight, self.name)
        batches = [list(plan)] if not self.config.sequential else [[name] for name in plan]
        for names in batches:
            hessians = self._collect(model, names, forward_loop)
            for name in names:
                layer = model.get_submodule(name)
                assert isinstance(layer, torch.nn.Linear)  # planned layers are Linear layers
                accumulated = hessians.pop(name)  # not held under the next layer's pass
                if accumulated.samples == 0:
                    raise PluginError(f"gptq: layer {name!r} saw no calibration data")
                result = gptq_quantize(
                    layer.weight,
                    accumulated.hessian,
                    plan[name],
                    self.config.group_size,
                    self.config.symmetric,
                    self.config.damp,
                    self.config.block_size,
                    self.config.act_order,
                )
                fp32 = layer.weight.dtype == torch.float32
                self._results[name] = _Grid.of(result) if fp32 else result
                # Later layers see this one's quantized output. A new tensor, not an
                # in-place copy: a weight tied to another module (an LM head sharing the
                # token embedding) must not rewrite that module too.
                layer.weight = torch.nn.Parameter(
                    result.dequantize().to(layer.weight.dtype), layer.weight.requires_grad
                )
                del result, accumulated
        return model

    @staticmethod
    def _collect(
        model: torch.nn.Module, names: list[str], forward_loop: ForwardLoop
    ) -> dict[str, HessianAccumulator]:
        """The Hessians of ``names``' inputs over the calibration data. Each forward pass
        stops once every layer of ``names`` has seen its input (nothing after them is
        needed): taken layer by layer, the passes cost half of whole forwards. A layer
        run more than once in a pass (shared weights) contributes the calls made before
        the pass stops."""
        hessians: dict[str, HessianAccumulator] = {}
        handles = []
        pending: set[str] = set()

        def seen(name: str, acc: HessianAccumulator, inputs: torch.Tensor) -> None:
            acc.add(inputs)
            pending.discard(name)
            if not pending:
                raise _AllSeen

        for name in names:
            layer = model.get_submodule(name)
            assert isinstance(layer, torch.nn.Linear)  # planned layers are Linear layers
            acc = hessians[name] = HessianAccumulator(layer.in_features)
            handles.append(
                layer.register_forward_pre_hook(
                    lambda _m, args, name=name, acc=acc: seen(name, acc, args[0])
                )
            )

        def until_seen(*args: object, **kwargs: object) -> object:
            pending.update(names)
            try:
                return model(*args, **kwargs)
            except _AllSeen:
                return None

        try:
            with torch.no_grad():
                forward_loop(until_seen)  # type: ignore[arg-type]  # called like the model
        finally:
            for handle in handles:
                handle.remove()
        return hessians

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        plan = planned_layers(model, self.config, self.bits.weight, self.name)
        missing = [name for name in plan if name not in self._results]
        if missing:
            raise PluginError(f"gptq: layer {missing[0]!r} was not calibrated before convert")
        return swap_planned_linears(
            model,
            plan,
            lambda name, layer, _bits: WeightOnlyLinear.from_quantized(
                self._quantized(name, layer), layer.bias
            ),
        )

    def _quantized(self, name: str, layer: torch.nn.Linear) -> GroupQuantized:
        """The layer's integers: kept, or read back from its dequantized fp32 weight."""
        found = self._results[name]
        if isinstance(found, GroupQuantized):
            return found
        weight = layer.weight.detach()
        q = quantize_with_qparams(
            weight, found.scale, found.zero_point, found.bits, found.group_size
        )
        quantized = GroupQuantized(q, found.scale, found.zero_point, found.bits, found.group_size)
        if not torch.equal(quantized.dequantize(), weight):
            raise PluginError(
                f"gptq: layer {name!r} changed between calibrate and convert (its weight is "
                "not its dequantized integers)"
            )
        return quantized


@dataclass(frozen=True)
class _Grid:
    """A quantized layer's scales and zero points, without its integers."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int | None

    @classmethod
    def of(cls, quantized: GroupQuantized) -> _Grid:
        return cls(quantized.scale, quantized.zero_point, quantized.bits, quantized.group_size)
