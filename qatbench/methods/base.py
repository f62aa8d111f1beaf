"""The contract every quantization method implements.

A method is a class with a registry ``name``, a nested pydantic ``Config`` for its options
and its ``capabilities`` as data. The runner drives the lifecycle; the method never sees
YAML, MLflow, files (other than the export path) or clocks::

    prepare(model) -> calibrate(model, forward_loop) -> train(model, train_loop)
        -> convert(model) -> export(model, example_inputs, path)

Each step returns the model and the runner always uses the returned value. ``calibrate``
is called only when ``capabilities.needs_calibration``, ``train`` only when
``capabilities.needs_training``. The runner owns the data: ``forward_loop(model)`` runs the
calibration batches through ``model``; ``train_loop(model, optimizer, steps)`` runs
``steps`` optimisation steps of the task loss with the method's optimizer.

A complete plugin, weight-only round-to-nearest with one scale per tensor, simulated in
fp32 (so it is honestly not smaller)::

    import torch
    from pydantic import Field
    from qatbench.methods.base import Capabilities, MethodConfig, QuantMethod

    class PerTensorRtn(QuantMethod):
        name = "per_tensor_rtn"
        capabilities = Capabilities(weight_bits=frozenset({4, 8}), weight_only=True)

        class Config(MethodConfig):
            skip_last: bool = Field(False, description="keep the classifier in fp32")

        def convert(self, model: torch.nn.Module) -> torch.nn.Module:
            linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            if self.config.skip_last:
                linears = linears[:-1]
            qmax = 2 ** (self.bits.weight - 1) - 1
            with torch.no_grad():
                for layer in linears:
                    scale = layer.weight.abs().max().clamp(min=1e-12) / qmax
                    layer.weight.copy_((layer.weight / scale).round().clamp(-qmax, qmax) * scale)
            return model

Register it in the plugin package's ``pyproject.toml``::

    [project.entry-points."qatbench.methods"]
    per_tensor_rtn = "my_package.rtn:PerTensorRtn"

and name it in an experiment: ``methods: [{name: per_tensor_rtn, options: {skip_last: true}}]``
with ``bits: [w4, w8]``. ``tests/test_method_contract.py`` runs the contract kit over every
registered method; ``qatbench.methods.contract.check_method`` runs it on one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from qatbench.quant.bitwidth import FP32, BitWidth
from qatbench.runtimes.base import (
    COMPILABLE,
    LEGACY_RUNTIME_ARTIFACTS,
    ONNX_GRAPH,
    TORCH_MODULE,
    RuntimeCapabilities,
)

ForwardLoop = Callable[[torch.nn.Module], None]
TrainLoop = Callable[[torch.nn.Module, torch.optim.Optimizer, int], None]

# The default of ``Capabilities.artifacts``: the converted module and the exported graph,
# so every runtime that does not compile can run the method.
ALL_RUNTIMES = frozenset({TORCH_MODULE, ONNX_GRAPH})
# Compiling runtimes (torch.compile's inductor) are opt-in: a method adds COMPILED where
# inductor can compile its converted model whole (qatbench's fbgemm-backed layers cannot
# be: their quantized tensors have no fake-tensor support, so dynamo would fall back to
# eager around them).
COMPILED = frozenset({COMPILABLE})
TORCH_ONLY = frozenset({TORCH_MODULE, COMPILABLE})  # no ONNX export
GRAPH_ONLY = frozenset({ONNX_GRAPH})  # only the exported graph runs (other toolkits' quantizers)
# Values of ``Capabilities.layer_types``: the default, and Linear plus 1-d and 2-d convolutions.
LINEAR_ONLY = frozenset({"Linear"})
LINEAR_AND_CONV = frozenset({"Linear", "Conv1d", "Conv2d"})


class MethodConfig(BaseModel):
    """Base of every method's options: unknown keys rejected, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, as data the spec checks before anything is built.

    ``weight_bits`` empty means the method does not quantize (it runs once, as ``fp32``).
    ``activation_bits`` lists the activation widths of ``wNaM`` labels; ``weight_only``
    says whether ``wN`` labels (activations left in floating point) are accepted.
    ``artifacts`` says what runtimes can execute: ``TORCH_MODULE`` (the converted module),
    ``ONNX_GRAPH`` (the graph ``export`` writes) and ``COMPILABLE`` (a compiling runtime may
    compile the module whole; opt in with ``ALL_RUNTIMES | COMPILED``). A runtime runs the
    method when it runs one of these artifacts (:mod:`qatbench.runtimes.base`), so a new
    runtime of ONNX graphs runs every exporting method. ``runtimes=`` with runtime names
    (``torch``, ``onnxruntime``, ``torch_compile``) is still accepted and translated.
    ``layer_types`` names the ``torch.nn`` layer classes the method quantizes (``Linear``,
    ``Conv1d``, ``Conv2d``); layers of other types are left as they are, and every trial
    measures the share of the model's weight bytes that it did quantize
    (``quantized_weight_fraction``).
    ``keeps_weights`` promises that the method never writes into a tensor of the model it
    is given (it may replace tensors and modules): the driver then hands it a copy sharing
    the fp32 model's weight storage instead of a deep copy, so a trial holds the fp32
    weights once (:func:`qatbench.methods.lifecycle.quantize_copy`).
    ``reusable_model`` promises that the converted model is all that ``export``,
    ``choices`` and measurement read afterwards (the method keeps nothing of its
    calibration for later) and that it is picklable: a sweep then converts once per model,
    method, options and bits, and its trials on other runtimes load that model instead of
    quantizing again (:mod:`qatbench.trial.shared_fp32`).
    """

    weight_bits: frozenset[int] = frozenset()
    activation_bits: frozenset[int] = frozenset()
    weight_only: bool = False
    needs_calibration: bool = False
    needs_training: bool = False
    artifacts: frozenset[str] = field(default_factory=lambda: ALL_RUNTIMES)
    layer_types: frozenset[str] = LINEAR_ONLY
    keeps_weights: bool = False
    reusable_model: bool = False
    runtimes: InitVar[frozenset[str] | None] = None

    def __post_init__(self, runtimes: frozenset[str] | None) -> None:
        if runtimes is not None:
            unknown = (
                set(runtimes)
                - set(LEGACY_RUNTIME_ARTIFACTS)
                - {TORCH_MODULE, ONNX_GRAPH, COMPILABLE}
            )
            if unknown:
                raise ValueError(f"capabilities: unknown runtimes {sorted(unknown)}")
            kinds = {k for r in runtimes for k in LEGACY_RUNTIME_ARTIFACTS.get(r, {r})}
            object.__setattr__(self, "artifacts", frozenset(kinds))

    def runs_on(self, runtime: RuntimeCapabilities) -> bool:
        """Whether a runtime with these capabilities can execute this method's output."""
        return runtime.runs(self.artifacts)

    @property
    def quantizes(self) -> bool:
        return bool(self.weight_bits)

    def allowed_bits(self) -> list[str]:
        """Every bit-width label this method accepts, for error messages and listings."""
        if not self.quantizes:
            return ["fp32"]
        labels = [f"w{w}" for w in sorted(self.weight_bits)] if self.weight_only else []
        labels += [
            f"w{w}a{a}" for w in sorted(self.weight_bits) for a in sorted(self.activation_bits)
        ]
        return labels

    def layer_classes(self) -> tuple[type[torch.nn.Module], ...]:
        """The ``torch.nn`` classes named in ``layer_types``."""
        return tuple(getattr(torch.nn, name) for name in sorted(self.layer_types))

    def accepts(self, bits: BitWidth) -> bool:
        if not self.quantizes:
            return bits == FP32
        if bits.weight not in self.weight_bits:
            return False
        if bits.weight_only:
            return self.weight_only
        return bits.activation in self.activation_bits


class QuantMethod:
    """Base class of quantization methods; override the lifecycle steps you need."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    capabilities: ClassVar[Capabilities] = Capabilities()
    # True when the converted model only simulates quantization (fp32 storage and compute);
    # recorded with every trial so the report can say so.
    simulated: ClassVar[bool] = False
    # True when the method rewrites what a layer receives (smoothing folded into the layer
    # before it): the runner then skips the per-layer error, which would compare unlike
    # inputs.
    changes_layer_inputs: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Bits are declared once, in ``capabilities``: a Config with per-layer ``overrides``
        (``override_bits``) accepts exactly the weight widths the method declares."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "Config" in own and "capabilities" in own and hasattr(cls.Config, "override_bits"):
            cls.Config.override_bits = cls.capabilities.weight_bits  # type: ignore[attr-defined]

    def __init__(self, config: MethodConfig | None = None, bits: BitWidth = FP32) -> None:
        self.config: Any = config if config is not None else self.Config()
        self.bits = bits

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Insert observers or fake-quant modules; return the model to calibrate/train."""
        return model

    def calibrate(self, model: torch.nn.Module, forward_loop: ForwardLoop) -> torch.nn.Module:
        """Run ``forward_loop(model)`` to collect activation statistics."""
        return model

    def train(self, model: torch.nn.Module, train_loop: TrainLoop) -> torch.nn.Module:
        """Fine-tune with ``train_loop(model, optimizer, steps)``."""
        return model

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        """Return the deployable model (real integers where the method claims them)."""
        return model

    def describe(self) -> dict[str, str]:
        """What the exported graph's metadata and the report say of this configuration:
        ``observer`` (how activations were calibrated; "none" without calibration) and
        ``group_size`` (weights per scale: a number, "per_channel", or "n/a"). The default
        reads the Config's ``observer`` (or ``calibrate_method``) and ``group_size`` (or
        ``block_size``) fields; a method whose options say it otherwise overrides this."""
        config = self.config
        observer = "none"
        if self.capabilities.needs_calibration:
            chosen = getattr(config, "observer", None)
            observer = str(
                getattr(chosen, "name", None) or getattr(config, "calibrate_method", "default")
            )
        group: object = "n/a"
        if hasattr(config, "group_size"):
            group = config.group_size or "per_channel"
        elif hasattr(config, "block_size"):
            group = config.block_size
        return {"observer": observer, "group_size": str(group)}

    def choices(self) -> dict[str, Any]:
        """What the method chose for itself while quantizing (an option given as ``auto``
        and searched), recorded in the trial's ``details`` after ``convert``."""
        return {}

    def export(
        self, model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path
    ) -> Path:
        """Write the converted model as ONNX to ``path`` and return it."""
        from qatbench.runtimes.onnx_export import export_onnx

        return export_onnx(model, example_inputs, path)
