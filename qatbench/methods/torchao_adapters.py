"""torchao's int8 configs as peers (optional extra: ``pip install 'qatbench[torchao]'``).

- ``torchao_int8_dynamic``: ``Int8DynamicActivationInt8WeightConfig`` (``w8a8``), int8
  weights and per-call int8 activations.
- ``torchao_int8_weight_only``: ``Int8WeightOnlyConfig`` (``w8``).

Both replace Linear weights with torchao tensor subclasses, which run in torch only (the
TorchScript exporter cannot trace them; use the ``ort_*`` methods or qatbench's own for
onnxruntime). torchao's int8 kernels are meant for ``torch.compile`` (runtime
``torch_compile``); in eager mode (``torch``) they are slower than fp32 on CPU. torchao's int4
configs need CUDA, ``mslk`` or bf16-only layouts and fail on a CPU, so they are not offered.

This module imports without torchao. When torchao is missing the methods stay listed,
:func:`unavailable_reason` says why they cannot run, and ``convert`` raises a
:class:`PluginError` with the install command.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from qatbench.errors import PluginError
from qatbench.methods.base import Capabilities, QuantMethod
from qatbench.methods.layer_selection import LayerSelection, select_linears

# Eager and compiled: torchao's int8 tensor subclasses are meant for torch.compile.
TORCH_ONLY = frozenset({"torch", "torch_compile"})
INSTALL_HINT = "torchao is not installed: pip install 'qatbench[torchao]'"


def unavailable_reason() -> str | None:
    """Why the torchao methods cannot run here, or None when torchao is importable."""
    return None if importlib.util.find_spec("torchao") is not None else INSTALL_HINT


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """torchao logs every optional CUDA extension it fails to load; none matter on a CPU."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _torchao_quantization() -> Any:
    try:
        with _quiet_import():
            import torchao.quantization as tq
    except ImportError as exc:
        raise PluginError(f"{INSTALL_HINT} ({exc})") from None
    return tq


class _TorchaoMethod(QuantMethod):
    """Applies torchao's ``quantize_`` with :meth:`_config` to the model's Linears."""

    capabilities: ClassVar[Capabilities]
    unavailable_reason = staticmethod(unavailable_reason)

    class Config(LayerSelection):
        override_bits: ClassVar[frozenset[int]] = frozenset({8})

    def _config(self, tq: Any) -> Any:
        raise NotImplementedError

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        tq = _torchao_quantization()
        chosen = set(select_linears(model, self.config, self.bits.weight))

        def wanted(module: torch.nn.Module, fqn: str) -> bool:
            return isinstance(module, torch.nn.Linear) and fqn in chosen

        tq.quantize_(model, self._config(tq), filter_fn=wanted)
        return model

    def export(
        self, model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path
    ) -> Path:
        raise PluginError(
            f"{self.name}: torchao's quantized tensors do not export to ONNX; "
            "for onnxruntime use qatbench's own methods or the ort_* adapters"
        )


class TorchaoInt8DynamicMethod(_TorchaoMethod):
    """torchao ``Int8DynamicActivationInt8WeightConfig``."""

    name = "torchao_int8_dynamic"
    capabilities = Capabilities(
        weight_bits=frozenset({8}), activation_bits=frozenset({8}), runtimes=TORCH_ONLY
    )

    def _config(self, tq: Any) -> Any:
        return tq.Int8DynamicActivationInt8WeightConfig()


class TorchaoInt8WeightOnlyMethod(_TorchaoMethod):
    """torchao ``Int8WeightOnlyConfig``."""

    name = "torchao_int8_weight_only"
    capabilities = Capabilities(weight_bits=frozenset({8}), weight_only=True, runtimes=TORCH_ONLY)

    def _config(self, tq: Any) -> Any:
        return tq.Int8WeightOnlyConfig()
