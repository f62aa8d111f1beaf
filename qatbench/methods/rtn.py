"""Weight-only round-to-nearest (``rtn``): N-bit integer weights, floating-point activations.

Each ``nn.Linear`` becomes a :class:`~qatbench.quant.weight_only_linear.WeightOnlyLinear`:
min-max integers per group of ``group_size`` input features (``null``: per output
channel), symmetric or with zero points, packed in the artifact (8 bits one byte, 4 bits
two per byte, 3 bits eight per three bytes, 2 bits four per byte) with fp32 scales. Torch
runs integer-weight kernels (``int8pack_mm``, ``int4pack_mm``; see that module for which
layouts have one and for measured speeds); layouts without one dequantize per call, say
so (``dequantizes_per_call``) and are refused when an experiment is validated, with one
line naming the key, unless it sets ``allow_dequantize: true`` (the spec checks pass the
grid's bits and runtimes as validation context). onnxruntime runs the exported
DequantizeLinear+MatMul fused into ``MatMulNBits``.

``keep_fp32`` and ``overrides`` give per-layer precision (:mod:`.layer_selection`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import Field, ValidationInfo, field_validator

from qatbench.errors import PluginError
from qatbench.memory import release_free_memory
from qatbench.methods.base import ALL_RUNTIMES, COMPILED, Capabilities, QuantMethod
from qatbench.methods.layer_selection import LayerSelection, select_linears
from qatbench.quant.bitwidth import BitWidth
from qatbench.quant.weight_only_linear import INT4_KERNEL_GROUPS, WeightOnlyLinear, choose_kernel

WEIGHT_ONLY_BITS = frozenset({2, 3, 4, 8})
#: the runtimes whose weight-only layers run torch kernels (or dequantize per call)
TORCH_RUNTIMES = frozenset({"torch", "torch_compile"})


def no_kernel_reason(widths: set[int], group_size: int | None) -> str | None:
    """Why weights of these ``widths`` in groups of ``group_size`` would dequantize on every
    torch call (no packed kernel for the layout), or None when each has a kernel."""
    missing = sorted(w for w in widths if choose_kernel(w, group_size) == "dequantize")
    if not missing:
        return None
    grouping = "per channel" if group_size is None else f"in groups of {group_size}"
    return (
        f"w{missing[0]} weights {grouping} have no torch kernel and dequantize per call "
        f"(slower than fp32); torch kernels: int8 per channel (group_size: null), int2-4 per "
        f"channel or in groups of {', '.join(map(str, sorted(INT4_KERNEL_GROUPS)))}; "
        "set allow_dequantize: true to measure it anyway"
    )


def _planned_widths(context: dict[str, Any], overrides: dict[str, int]) -> set[int]:
    """Weight widths the experiment's torch trials of this method would store."""
    if not TORCH_RUNTIMES & set(context.get("runtimes", ())):
        return set()  # onnxruntime only: MatMulNBits runs every layout
    widths = set(overrides.values())
    for label in context.get("bits", ()):
        with contextlib.suppress(ValueError):  # a bad label is reported by the spec checks
            bits = BitWidth.parse(label)
            if bits.weight_only:
                widths.add(bits.weight)
    return widths


class WeightOnlyConfig(LayerSelection):
    """Options shared by the weight-only methods."""

    override_bits: ClassVar[frozenset[int]] = WEIGHT_ONLY_BITS

    allow_dequantize: bool = Field(
        False,
        description="accept a layout with no torch kernel (e.g. int8 in groups), whose torch "
        "trials dequantize the weights on every call; without it such a grid is rejected",
    )
    group_size: int | None = Field(
        None,
        description="input features per scale: a power of two >= 16 that divides every "
        "quantized layer's inputs; null: one scale per output channel",
    )
    symmetric: bool = Field(True, description="zero point 0; false: a uint8 zero point per group")

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"group_size must be a power of two >= 16 or null, got {value}")
        # The spec checks pass the experiment's bits and runtimes as validation context.
        if info.context and not info.data.get("allow_dequantize", False):
            widths = _planned_widths(info.context, info.data.get("overrides", {}))
            reason = no_kernel_reason(widths, value)
            if reason:
                raise ValueError(reason)
        return value


def check_divides(name: str, layer: torch.nn.Linear, group_size: int | None, method: str) -> None:
    """PluginError naming the layer when ``group_size`` does not divide its inputs."""
    if group_size is not None and layer.in_features % group_size:
        divisors = [g for g in (16, 32, 64, 128, 256) if layer.in_features % g == 0]
        hint = (
            f"group sizes that divide it: {divisors}" if divisors else "no power of two >= 16 does"
        )
        raise PluginError(
            f"{method}: group_size {group_size} does not divide the {layer.in_features} input "
            f"features of layer {name!r} ({hint}); use group_size: null (per channel) or keep "
            f"the layer in fp32 with keep_fp32: [{name!r}]"
        )


def planned_layers(
    model: torch.nn.Module, config: WeightOnlyConfig, bits: int, method: str
) -> dict[str, int]:
    """``name -> bits`` of the layers to quantize, group size checked against each."""
    plan = select_linears(model, config, bits)
    for name in plan:
        layer = model.get_submodule(name)
        assert isinstance(layer, torch.nn.Linear)  # select_linears returns Linear layers only
        check_divides(name, layer, config.group_size, method)
    return plan


def swap_planned_linears(
    model: torch.nn.Module,
    plan: dict[str, int],
    quantize: Callable[[str, torch.nn.Linear, int], WeightOnlyLinear],
) -> torch.nn.Module:
    """Swap each planned ``nn.Linear`` for ``quantize(name, layer, bits)``, giving each
    layer's temporaries back before the next (:func:`~qatbench.memory.release_free_memory`:
    freed, they had stayed resident, 0.7 GiB by the end of a 0.25B Llama's 113 layers)."""
    for name, bits in plan.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, torch.nn.Linear)  # planned layers are Linear layers
        model.set_submodule(name, quantize(name, layer, bits))
        release_free_memory()
    return model


class RtnMethod(QuantMethod):
    """Round-to-nearest weight-only quantization (``w8``, ``w4``, ``w3``, ``w2``)."""

    name = "rtn"
    # convert builds new layers from the weights and never writes into them
    capabilities = Capabilities(
        weight_bits=WEIGHT_ONLY_BITS,
        weight_only=True,
        runtimes=ALL_RUNTIMES | COMPILED,
        keeps_weights=True,
        reusable_model=True,
    )

    class Config(WeightOnlyConfig):
        pass

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        config = self.config
        plan = planned_layers(model, config, self.bits.weight, self.name)
        return swap_planned_linears(
            model,
            plan,
            lambda _name, layer, bits: WeightOnlyLinear.from_float(
                layer, bits, config.group_size, config.symmetric
            ),
        )
