"""onnxruntime sessions on the CPU execution provider, with fixed thread counts."""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from qatbench.data.inputs import Batch
from qatbench.runtimes.base import ONNX_GRAPH, Loaded, Runtime, RuntimeCapabilities

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


def as_callable(session: ort.InferenceSession | _Slot) -> Callable[..., Any]:
    """``fn(*inputs)`` over torch tensors, like calling the torch model: one output is a
    tensor, several a tuple of tensors. A :class:`_Slot` is read at each call: the call
    runs the slot's current session."""
    slot = session if isinstance(session, _Slot) else _Slot(session)
    names = [i.name for i in slot.session.get_inputs()]

    def run(*inputs: torch.Tensor) -> Any:
        feed = {n: x.numpy() for n, x in zip(names, inputs, strict=True)}
        outs = [torch.from_numpy(o) for o in slot.session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return run


def runner_for(session: ort.InferenceSession, *inputs: torch.Tensor) -> Callable[[], object]:
    """A zero-argument call for the timer; the inputs are converted once, outside timing."""
    names = [i.name for i in session.get_inputs()]
    feed = {n: np.ascontiguousarray(x.numpy()) for n, x in zip(names, inputs, strict=True)}
    return lambda: session.run(None, feed)


class _Slot:
    """The session a :class:`Loaded` calls; :meth:`OnnxRuntime.fresh` replaces it."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session


def graph_call(session: ort.InferenceSession) -> Loaded:
    """A session as a runtime's :class:`~qatbench.runtimes.base.Loaded` call."""
    slot = _Slot(session)
    binder = lambda *inputs: runner_for(slot.session, *inputs)  # noqa: E731
    return Loaded(as_callable(slot), binder=binder, handle=slot)


class OnnxRuntime(Runtime):
    """``onnxruntime``: the exported graph on the CPU execution provider, all graph
    optimisations, ``measure.threads`` intra-op threads; each timing repeat opens a new
    session; ``int_op_fraction`` counts the integer nodes of the optimised graph.

    A fresh session replaces the one its :class:`Loaded` held, which is closed first:
    a trial holds one session of its graph at a time, not the evaluation's and each
    repeat's (a graph's weights, prepacked, are about its size again)."""

    name = "onnxruntime"
    capabilities = RuntimeCapabilities(artifact=ONNX_GRAPH)
    description = "CPU provider, all graph optimisations"

    def load(self, artifact: Any, inputs: Sequence[Batch]) -> Loaded:
        return graph_call(make_session(Path(artifact), self.threads))

    def fresh(self, artifact: Any, loaded: Loaded) -> Loaded:
        slot = loaded.handle
        if not isinstance(slot, _Slot):
            return self.load(artifact, [])
        slot.session = None  # closed here unless a caller still holds it
        gc.collect()
        slot.session = make_session(Path(artifact), self.threads)
        return loaded

    def integer_fraction(self, artifact: Any) -> float | None:
        integer, floating = kernel_counts(Path(artifact), self.threads)
        return integer / max(integer + floating, 1)


def kernel_counts(path: Path, threads: int) -> tuple[int, int]:
    """(integer, floating-point) matrix-multiply/convolution nodes after ORT's optimisations."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = session_options(threads)
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.disable_prepacking", "1")  # nodes only
        # weights beside the optimised graph, not in it: only its nodes are read
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.onnx.data"
        )
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized), load_external_data=False).graph
        ops = [node.op_type for node in graph.node]
    return sum(op in INTEGER_KERNELS for op in ops), sum(op in FLOAT_KERNELS for op in ops)
