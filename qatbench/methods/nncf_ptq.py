"""NNCF's post-training quantization as a peer (optional extra: ``pip install 'qatbench[nncf]'``).

``nncf_ptq`` quantizes the exported fp32 ONNX graph with ``nncf.quantize``, the toolkit
OpenVINO's int8 models are made with: it inserts QuantizeLinear/DequantizeLinear pairs
(int8 weights per output channel, 8-bit activations per tensor), calibrated on the
runner's calibration batches, and applies NNCF's fast bias correction. As with
``ort_static``, the torch model stays fp32 (``calibrate`` records the input batches,
``export`` quantizes), so only runtimes of ONNX graphs run it: ``onnxruntime`` and
``openvino``.

Options: ``preset`` (``performance``: symmetric activations; ``mixed``: asymmetric
activations, for activations that are not centred on zero such as after GELU),
``subset_size`` (calibration samples NNCF uses: the recorded batches are split into single
samples, so it counts samples as in NNCF's own documentation), ``model_type``
(``transformer`` keeps attention's softmax and normalisation in floating point),
``fast_bias_correction`` and ``nodes_to_exclude`` (ONNX node names left in floating point).

The module imports without nncf: the method stays listed, :func:`unavailable_reason` says
what to install (``qatbench validate`` reports it), and ``export`` raises a
:class:`PluginError` with the install command.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from pydantic import Field

from qatbench.errors import PluginError
from qatbench.methods.base import (
    GRAPH_ONLY,
    Capabilities,
    ForwardLoop,
    MethodConfig,
    QuantMethod,
)
from qatbench.methods.ort_quantizers import InputRecorder
from qatbench.runtimes.onnx_export import export_onnx, save_graph

INSTALL_HINT = "nncf is not installed: pip install 'qatbench[nncf]'"
INT8 = frozenset({8})


def unavailable_reason() -> str | None:
    """Why nncf_ptq cannot run here, or None when nncf is importable."""
    return None if importlib.util.find_spec("nncf") is not None else INSTALL_HINT


def _nncf() -> Any:
    try:
        import nncf
    except ImportError as exc:
        raise PluginError(f"{INSTALL_HINT} ({exc})") from None
    nncf.set_log_level(logging.ERROR)  # progress bars and advice on every call
    return nncf


class NncfPtqMethod(QuantMethod):
    """``nncf.quantize`` on the exported fp32 graph, calibrated on the runner's batches."""

    name = "nncf_ptq"
    capabilities = Capabilities(
        weight_bits=INT8, activation_bits=INT8, needs_calibration=True, artifacts=GRAPH_ONLY
    )
    unavailable_reason = staticmethod(unavailable_reason)

    class Config(MethodConfig):
        preset: Literal["performance", "mixed"] = Field(
            "performance",
            description="performance: symmetric activations; mixed: asymmetric activations",
        )
        subset_size: int = Field(
            300, ge=1, description="calibration samples NNCF uses (at most those recorded)"
        )
        model_type: Literal["default", "transformer"] = Field(
            "default", description="transformer: NNCF's rules for attention blocks"
        )
        fast_bias_correction: bool = Field(
            True, description="correct each quantized layer's bias shift (NNCF's default)"
        )
        nodes_to_exclude: list[str] = Field(
            default_factory=list, description="ONNX node names left in floating point"
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._samples: list[tuple[np.ndarray, ...]] = []

    def describe(self) -> dict[str, str]:
        return {"observer": f"nncf_{self.config.preset}", "group_size": "per_channel"}

    def calibrate(self, model: torch.nn.Module, forward_loop: ForwardLoop) -> torch.nn.Module:
        recorder = InputRecorder(model)
        with torch.no_grad():
            forward_loop(recorder)
        self._samples = [
            tuple(x[i : i + 1] for x in batch)
            for batch in recorder.batches
            for i in range(len(batch[0]))
        ]
        return model

    def export(
        self, model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path
    ) -> Path:
        nncf = _nncf()
        if not self._samples:
            raise PluginError(f"{self.name}: no calibration data; calibrate() must run first")
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        with tempfile.TemporaryDirectory(prefix="qatbench-nncf-") as tmp:
            fp32 = onnx.load(str(export_onnx(model, example_inputs, Path(tmp) / "fp32.onnx")))
        names = [i.name for i in fp32.graph.input]
        feeds = [dict(zip(names, sample, strict=True)) for sample in self._samples]
        quantized = nncf.quantize(
            fp32,
            nncf.Dataset(feeds),
            preset=nncf.QuantizationPreset(cfg.preset),
            subset_size=min(cfg.subset_size, len(feeds)),
            fast_bias_correction=cfg.fast_bias_correction,
            model_type=nncf.ModelType.TRANSFORMER if cfg.model_type == "transformer" else None,
            ignored_scope=nncf.IgnoredScope(names=list(cfg.nodes_to_exclude), validate=False)
            if cfg.nodes_to_exclude
            else None,
        )
        save_graph(quantized, path)
        return path
