"""The contract every runtime implements: what executes a trial's converted model.

A runtime is a class with a registry ``name`` and its ``capabilities`` as data: which
artifact it runs (``TORCH_MODULE``, the converted torch module, or ``ONNX_GRAPH``, the
graph the method's ``export`` writes) and whether it compiles a module before timing. A
method says which artifacts it produces (``Capabilities.artifacts`` in
:mod:`qatbench.methods.base`), so a new runtime that runs ONNX graphs works with every
exporting method at once. The trial drives a runtime with three operations:

- ``load(artifact, inputs)``: a :class:`Loaded` callable of the module or of the graph's
  path, ready for ``inputs`` (the tensors it will be timed on: a compiling runtime
  compiles for their shapes here, and the trial times this as its ``compile`` phase);
- ``fresh(artifact, loaded)``: a new instance for one timing repeat (a new session, a
  copy), so where objects lie in memory varies between repeats;
- ``integer_fraction(artifact)``: the share of matmul/conv work that runs on integer
  kernels, as the runtime itself reports it, or None where it cannot tell.

A complete plugin, onnxruntime with basic graph optimisations only (it inherits
``integer_fraction`` from the built-in onnxruntime runtime)::

    from pathlib import Path

    import onnxruntime as ort
    from qatbench.runtimes.base import ONNX_GRAPH, Loaded, RuntimeCapabilities
    from qatbench.runtimes.onnxruntime import OnnxRuntime, graph_call, session_options

    class OrtBasic(OnnxRuntime):
        name = "ort_basic"
        capabilities = RuntimeCapabilities(artifact=ONNX_GRAPH)
        description = "onnxruntime, basic graph optimisations"

        def load(self, artifact: Path, inputs) -> Loaded:
            options = session_options(self.threads)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            session = ort.InferenceSession(str(artifact), options)
            return graph_call(session)

Register it in the plugin package's ``pyproject.toml``::

    [project.entry-points."qatbench.runtimes"]
    ort_basic = "my_package.runtimes:OrtBasic"

and name it in an experiment: ``runtimes: [torch, ort_basic]``.
``qatbench.runtimes.contract.check_runtime(OrtBasic)`` runs the contract kit on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal

import torch

from qatbench.data.inputs import Batch
from qatbench.models.copies import shared_copy

TORCH_MODULE: Final = "torch_module"  # the converted torch module, called in Python
ONNX_GRAPH: Final = "onnx_graph"  # the graph written by the method's export()
COMPILABLE: Final = "compilable"  # a method's module that a compiling runtime may compile

Artifact = Literal["torch_module", "onnx_graph"]
# The key of Loaded.details that holds the settings a runtime ran with (also MLflow params).
RUNTIME_SETTINGS: Final = "runtime_settings"
# The runtime that checks every exported graph (parity with torch, integer kernels) in
# trials whose own runtime runs the torch module.
REFERENCE_GRAPH_RUNTIME = "onnxruntime"
# What the built-in runtimes' names meant in a method's ``Capabilities(runtimes=...)``
# before runtimes were plugins; such plugins keep working.
LEGACY_RUNTIME_ARTIFACTS = {
    "torch": {TORCH_MODULE},
    "onnxruntime": {ONNX_GRAPH},
    "torch_compile": {TORCH_MODULE, COMPILABLE},
}


@dataclass(frozen=True)
class RuntimeCapabilities:
    """What a runtime runs, as data the spec checks before anything is built."""

    artifact: Artifact
    compiles: bool = False  # compiles the module in load(); the trial times it as a phase
    decodes: bool = True  # language-model generation (prefill, decode) is measured on it
    # The precision its floating-point layers compute in ("fp32", "bf16"): the contract kit
    # allows that precision's rounding when it compares the runtime with torch.
    precision: Literal["fp32", "bf16"] = "fp32"

    def runs(self, artifacts: frozenset[str]) -> bool:
        """Whether a method producing ``artifacts`` can run here."""
        if self.artifact not in artifacts:
            return False
        return not self.compiles or COMPILABLE in artifacts


@dataclass
class Loaded:
    """A callable instance of an artifact.

    ``fn(*inputs)`` returns what the model returns (a tensor; a tuple for a graph with
    several outputs). ``bind(*inputs)`` is the zero-argument call the timer repeats:
    ``fn`` on the inputs, or ``binder(*inputs)`` where the runtime converts the inputs
    once, outside timing. ``metrics``, ``details`` and
    ``warnings`` are what loading measured (a compile time, the precision used); the trial
    records them. ``details[RUNTIME_SETTINGS]`` (a flat dict: the precision used, threads)
    is also logged as the trial's MLflow params ``runtime_settings.*``. ``handle`` is the
    runtime's own (what its :meth:`Runtime.fresh` renews in place), never recorded."""

    fn: Callable[..., Any]
    binder: Callable[..., Callable[[], object]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    handle: Any = field(default=None, repr=False)

    def bind(self, *inputs: torch.Tensor) -> Callable[[], object]:
        if self.binder is not None:
            return self.binder(*inputs)
        return functools.partial(self.fn, *inputs)


class Runtime:
    """Base class of runtimes; ``load`` is the one operation a plugin must implement."""

    name: ClassVar[str]
    capabilities: ClassVar[RuntimeCapabilities]
    description: ClassVar[str] = ""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this runtime cannot run here (an optional extra not installed), or None."""
        return None

    def load(self, artifact: Any, inputs: Sequence[Batch]) -> Loaded:
        """A callable of ``artifact`` (a module, or the graph's path), ready for ``inputs``."""
        raise NotImplementedError

    def fresh(self, artifact: Any, loaded: Loaded) -> Loaded:
        """A new instance for one timing repeat: loaded again by default; a module is
        copied (see :class:`EagerModule`)."""
        return self.load(artifact, [])

    def integer_fraction(self, artifact: Any) -> float | None:
        """Share of the artifact's matmul/conv nodes that run on integer kernels here."""
        return None

    def timing_warnings(self) -> list[str]:
        """Anything that happened while the trial timed this runtime's calls (a recompile)."""
        return []


class EagerModule(Runtime):
    """Shared by runtimes that call the torch module: fresh instances are copies of the
    module objects sharing its weights (:func:`~qatbench.models.copies.shared_copy`); a
    module that cannot be copied is timed as it is, and ``details`` says so."""

    def __init__(self, threads: int = 1) -> None:
        super().__init__(threads)
        self._copyable = True  # until the first copy fails: not tried again

    def load(self, artifact: Any, inputs: Sequence[Batch]) -> Loaded:
        return Loaded(artifact)

    def fresh(self, artifact: Any, loaded: Loaded) -> Loaded:
        if self._copyable:
            try:
                with torch.inference_mode(False):  # copies made like the models they copy
                    return Loaded(shared_copy(artifact))
            except Exception as exc:
                self._copyable = False
                loaded.details["timed_candidate"] = f"the same instance: copy failed ({exc})"
        return loaded
