"""onnxruntime sessions on the CPU execution provider, with fixed thread counts."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

# Nodes that multiply matrices or convolve: the work that integer kernels should take.
INTEGER_KERNELS = frozenset(
    {
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QGemm",
        "QLinearConv",
        "ConvInteger",
        "MatMulNBits",
        "QAttention",
        "DynamicQuantizeLSTM",
    }
)
FLOAT_KERNELS = frozenset(
    {
        "MatMul",
        "Gemm",
        "FusedMatMul",
        "FusedGemm",
        "Conv",
        "FusedConv",
        "Attention",
        "MultiHeadAttention",
        "Einsum",
    }
)


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about serialising optimised graphs are noise
    return options


def make_session(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), session_options(threads), providers=["CPUExecutionProvider"]
    )


def as_callable(session: ort.InferenceSession) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(x) -> y`` over torch tensors, like calling the torch model."""
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run


def runner_for(session: ort.InferenceSession, x: torch.Tensor) -> Callable[[], object]:
    """A zero-argument call for the timer; the input is converted once, outside timing."""
    name = session.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(x.numpy())}
    return lambda: session.run(None, feed)


def kernel_counts(path: Path, threads: int) -> tuple[int, int]:
    """(integer, floating-point) matrix-multiply/convolution nodes after ORT's optimisations."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = session_options(threads)
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    return sum(op in INTEGER_KERNELS for op in ops), sum(op in FLOAT_KERNELS for op in ops)
