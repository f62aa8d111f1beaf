"""A runtime plugin as an outside package would write it (the one in runtimes/base.py's
docstring): onnxruntime with basic graph optimisations only, under its own name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from qatbench.runtimes.base import ONNX_GRAPH, Loaded, RuntimeCapabilities
from qatbench.runtimes.onnxruntime import OnnxRuntime, graph_call, session_options


class OrtBasic(OnnxRuntime):
    name = "ort_basic"
    capabilities = RuntimeCapabilities(artifact=ONNX_GRAPH)
    description = "onnxruntime, basic graph optimisations"

    def load(self, artifact: Any, inputs: Sequence[torch.Tensor]) -> Loaded:
        options = session_options(self.threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(str(Path(artifact)), options)
        return graph_call(session)
