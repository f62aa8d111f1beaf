"""SmoothQuant: static w8a8 after migrating activation outliers into the weights.

For a Linear ``y = x W^T`` with per-input-channel activation absmax ``a_j`` (from
calibration) and weight absmax ``w_j``, the smoothing factor is
``s_j = a_j**alpha / w_j**(1 - alpha)``; ``x / s`` and ``W * s`` give the same product with
flatter activations, which quantize better per tensor (Xiao et al. 2023).

Where the division by ``s`` goes, found from one traced calibration batch:

- into the preceding ``LayerNorm`` (its weight and bias), when that norm's output feeds
  only Linears; Linears sharing one norm share one ``s``;
- into the preceding Linear's output rows, when it feeds the Linear directly or through a
  ReLU (``relu(z) / s == relu(z / s)`` for ``s > 0``) and nothing else reads it;
- otherwise into a :class:`ScaledInput` multiply before the Linear (option
  ``unfoldable: scale``), or the layer is not smoothed (``unfoldable: skip``).

Then every Linear is quantized as ``ptq`` does it: a second calibration pass records the
smoothed ranges and ``convert`` builds :class:`QuantizedLinear` layers (integer kernels in
torch and, through the QDQ graph, in onnxruntime). With ``activations: dynamic`` the
smoothed Linears become ``dynamic``'s :class:`DynamicQuantizedLinear` instead (each call
quantizes its input on its own range; no second pass): on all-MiniLM-L6-v2 that took
``embedding_cosine`` from 0.9916 (plain ``dynamic``) to 0.9963 at ``alpha: 0.7``, at the same
speed (docs/bring-your-own.md). The best ``alpha`` depends on the model: a list
(``alpha: [0.5, 0.7, 0.85]``) runs one trial per value, and ``alpha: auto`` quantizes a copy
at each alpha of ``ALPHA_GRID`` and keeps the one whose outputs on the calibration data are
closest to fp32's (the trial's details say which, with each alpha's error).

Because folding changes what the preceding layer emits, a quantized layer expects smoothed
inputs; ``changes_layer_inputs = True`` tells the runner not to feed it fp32 inputs in a
per-layer error breakdown.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from qatbench.errors import PluginError
from qatbench.methods.base import Capabilities, ForwardLoop, QuantMethod
from qatbench.methods.layer_selection import LayerSelection, select_linears
from qatbench.methods.ptq import ObservedLinear
from qatbench.quant.dynamic_linear import DynamicQuantizedLinear
from qatbench.quant.observers import MinMaxConfig, ObserverChoice
from qatbench.quant.quantized_linear import QuantizedLinear

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # what alpha: auto tries

_RELU = {F.relu, torch.relu, torch.Tensor.relu}


class ScaledInput(torch.nn.Module):
    """``inner(x * inv_scale)``: smoothing that could not be folded into a neighbour."""

    inv_scale: torch.Tensor

    def __init__(self, inv_scale: torch.Tensor, inner: torch.nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_scale", inv_scale.detach().float().clone())
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.inv_scale)


@dataclass
class _Call:
    func: Any
    inputs: list[int]
    outputs: list[int]


@dataclass
class _Trace:
    """Top-level torch calls of one forward pass, keyed by tensor identity."""

    calls: list[_Call] = field(default_factory=list)
    keep: list[torch.Tensor] = field(default_factory=list)  # ids stay unique while alive
    recording: bool = False

    def consumers(self, tensor_id: int) -> list[_Call]:
        """Calls that read the tensor and produce tensors (metadata queries do not count)."""
        return [c for c in self.calls if tensor_id in c.inputs and c.outputs]


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: _Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.trace.keep += ins + outs
        self.trace.calls.append(_Call(func, [id(t) for t in ins], [id(t) for t in outs]))
        return out


class _TraceFirstCall(torch.nn.Module):
    """Runs ``model``; records the dataflow of the first call only.

    While recording, ``trace.recording`` is set so statistics hooks can stay out of the
    way (their own torch calls would read like extra consumers of a layer's input); the
    first batch then runs once more, unrecorded, for them.
    """

    def __init__(self, model: torch.nn.Module, trace: _Trace) -> None:
        super().__init__()
        self.model, self.trace, self.done = model, trace, False

    def forward(self, *args: Any) -> Any:
        if not self.done:
            self.done = True
            self.trace.recording = True
            try:
                with _Recorder(self.trace):
                    self.model(*args)
            finally:
                self.trace.recording = False
        return self.model(*args)


@dataclass
class _Group:
    """Linears that read one tensor and share one smoothing factor."""

    linears: list[str]
    fold_into: tuple[str, str] | None  # ("layernorm" | "linear", qualified name) or None


def _weight_owner(call: _Call, owners: dict[int, str]) -> str | None:
    hits = [owners[i] for i in call.inputs if i in owners]
    return hits[0] if len(hits) == 1 else None


def _groups(model: torch.nn.Module, trace: _Trace, targets: list[str]) -> list[_Group]:
    """Group target Linears by the tensor they read and find where ``1/s`` can fold."""
    modules = dict(model.named_modules())
    weight_of = {
        id(m.weight): n for n, m in modules.items() if getattr(m, "weight", None) is not None
    }
    linear_calls: dict[str, list[_Call]] = defaultdict(list)
    norm_calls: dict[str, list[_Call]] = defaultdict(list)
    for call in trace.calls:
        owner = _weight_owner(call, weight_of)
        if owner is None:
            continue
        module = modules[owner]
        if call.func is F.linear and isinstance(module, torch.nn.Linear):
            linear_calls[owner].append(call)
        elif call.func is F.layer_norm and isinstance(module, torch.nn.LayerNorm):
            norm_calls[owner].append(call)
    producer: dict[int, tuple[str, str]] = {}
    for kind, calls in (("linear", linear_calls), ("layernorm", norm_calls)):
        for name, made in calls.items():
            if len(made) == 1:  # a module called twice cannot take one folded factor
                producer[made[0].outputs[0]] = (kind, name)
    relu_input = {c.outputs[0]: c.inputs[0] for c in trace.calls if c.func in _RELU and c.outputs}

    by_input: dict[int, list[str]] = defaultdict(list)
    single = [n for n in targets if len(linear_calls.get(n, [])) == 1]
    for name in single:
        by_input[linear_calls[name][0].inputs[0]].append(name)
    groups = [_Group([n], None) for n in targets if n not in single]
    for tensor_id, names in by_input.items():
        readers = trace.consumers(tensor_id)
        exclusive = len(readers) == len(names) and all(
            _weight_owner(c, weight_of) in names for c in readers
        )
        fold = None
        if exclusive and tensor_id in producer and producer[tensor_id][1] not in names:
            fold = producer[tensor_id]
            if fold[0] == "layernorm" and modules[fold[1]].weight is None:
                fold = None
        elif exclusive and tensor_id in relu_input:
            pre = relu_input[tensor_id]
            before = producer.get(pre)
            if (
                before
                and before[0] == "linear"
                and before[1] not in names
                and len(trace.consumers(pre)) == 1
            ):
                fold = before
        groups.append(_Group(names, fold))
    return groups


@contextmanager
def _input_absmax(
    model: torch.nn.Module, names: list[str], trace: _Trace
) -> Iterator[dict[str, torch.Tensor]]:
    """While open, record each named Linear's per-input-channel absmax (except while
    ``trace`` is recording)."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if trace.recording:
                return
            x = args[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _linear(model: torch.nn.Module, name: str) -> torch.nn.Linear:
    module = model.get_submodule(name)
    if isinstance(module, ScaledInput):  # smoothed already, as the input of its own group
        module = module.inner
    assert isinstance(module, torch.nn.Linear)  # groups hold Linear names only
    return module


def _apply(model: torch.nn.Module, group: _Group, s: torch.Tensor) -> None:
    """``W * s`` for the group's Linears and ``1 / s`` where their input comes from."""
    for name in group.linears:
        linear = _linear(model, name)
        _rescale(linear, "weight", s.to(linear.weight.dtype))
        if group.fold_into is None:
            model.set_submodule(name, ScaledInput(1.0 / s, model.get_submodule(name)))
    if group.fold_into is None:
        return
    kind, name = group.fold_into
    source = _linear(model, name) if kind == "linear" else model.get_submodule(name)
    assert isinstance(source.weight, torch.Tensor)  # a LayerNorm or Linear, checked when grouped
    _rescale(source, "weight", 1.0 / (s if kind == "layernorm" else s[:, None]))
    if isinstance(source.bias, torch.Tensor):
        _rescale(source, "bias", 1.0 / s)


def _outputs(model: torch.nn.Module, forward_loop: ForwardLoop) -> list[torch.Tensor]:
    """Every floating-point tensor ``model`` returns over one pass of ``forward_loop``."""
    seen: list[torch.Tensor] = []

    class _Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = self.inner(*args, **kwargs)
            seen.extend(
                t.detach() for t in tree_leaves(out) if torch.is_tensor(t) and t.is_floating_point()
            )
            return out

    forward_loop(_Recorder())
    return seen


def _rescale(module: torch.nn.Module, attr: str, factor: torch.Tensor) -> None:
    """``module.attr *= factor`` as a new parameter, never in place: a weight tied to
    another module (an LM head sharing the token embedding) must not change that module."""
    old = getattr(module, attr)
    setattr(module, attr, torch.nn.Parameter(old.detach() * factor, old.requires_grad))


class SmoothQuantMethod(QuantMethod):
    """Activation-aware smoothing, then static per-channel/per-tensor integer Linears."""

    name = "smoothquant"
    changes_layer_inputs: ClassVar[bool] = True
    capabilities = Capabilities(
        weight_bits=frozenset({4, 8}),
        activation_bits=frozenset({8}),
        needs_calibration=True,
    )

    class Config(LayerSelection):
        alpha: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
            0.5,
            description="migration strength: 0 none, 1 all onto the weights; auto: the one of "
            f"{list(ALPHA_GRID)} whose quantized model is closest to fp32 on the calibration data",
        )
        unfoldable: Literal["scale", "skip"] = Field(
            "scale",
            description="a Linear whose input cannot absorb 1/s: multiply before it, or skip",
        )
        reduce_range: bool = Field(
            True, description="7-bit activations: avoids int16 saturation of x86 u8s8 kernels"
        )
        observer: ObserverChoice = Field(
            default_factory=MinMaxConfig,
            description="range of the smoothed activations, as in ptq",
        )
        activations: Literal["static", "dynamic"] = Field(
            "static",
            description="static: calibrated ranges (QuantizedLinear); dynamic: each call's own "
            "range, as the dynamic method (DynamicQuantizedLinear) on the smoothed weights",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._searched: dict[str, Any] = {}

    def choices(self) -> dict[str, Any]:
        return self._searched

    def calibrate(self, model: torch.nn.Module, forward_loop: ForwardLoop) -> torch.nn.Module:
        if self.config.activations == "dynamic" and self.bits.weight != 8:
            raise PluginError(
                f"{self.name}: activations: dynamic runs 8-bit weights only (got {self.bits})"
            )
        if self.config.alpha == "auto":
            return self._search_alpha(model, forward_loop)
        plan = select_linears(model, self.config, self.bits.weight)
        targets = list(plan)
        if not targets:
            raise PluginError(f"{self.name}: the model has no Linear layer to quantize")
        trace = _Trace()
        with _input_absmax(model, targets, trace) as stats, torch.no_grad():
            forward_loop(_TraceFirstCall(model, trace))
        missing = [n for n in targets if n not in stats]
        if missing:
            raise PluginError(f"{self.name}: layer {missing[0]!r} saw no calibration data")
        groups = _groups(model, trace, targets)
        trace.keep.clear()
        with torch.no_grad():
            # every factor from the original weights first, then all of them applied
            factors = [(g, self._factor(model, g, stats)) for g in groups]
            for group, factor in factors:
                if group.fold_into is not None or self.config.unfoldable == "scale":
                    _apply(model, group, factor)
        for target in targets:
            name = target
            if isinstance(model.get_submodule(name), ScaledInput):
                name = f"{name}.inner"
            layer = model.get_submodule(name)
            assert isinstance(layer, torch.nn.Linear)
            observer = self.config.observer
            model.set_submodule(
                name,
                ObservedLinear(
                    layer,
                    plan[target],
                    observer.build(7 if self.config.reduce_range else 8),
                    observer.build(8),
                ),
            )
        if self.config.activations == "static":  # dynamic layers take no ranges
            with torch.no_grad():
                forward_loop(model)
        return model

    def _search_alpha(self, model: torch.nn.Module, forward_loop: ForwardLoop) -> torch.nn.Module:
        """Calibrate and convert a copy at each alpha of ``ALPHA_GRID``; keep the alpha
        whose quantized outputs on the calibration data are closest to fp32's (mean squared
        error over every float output), and calibrate ``model`` with it."""
        with torch.no_grad():
            reference = _outputs(model, forward_loop)
        errors: dict[float, float] = {}
        for alpha in ALPHA_GRID:
            trial = type(self)(self.config.model_copy(update={"alpha": alpha}), self.bits)
            candidate = trial.convert(trial.calibrate(copy.deepcopy(model), forward_loop))
            with torch.no_grad():
                got = _outputs(candidate.eval(), forward_loop)
            errors[alpha] = sum(
                float(F.mse_loss(g.float(), r.float())) for g, r in zip(got, reference, strict=True)
            ) / max(len(reference), 1)
        best = min(errors, key=lambda a: errors[a])
        self._searched = {
            "smoothquant_alpha": best,
            "smoothquant_alpha_mse": {str(a): e for a, e in errors.items()},
        }
        self.config = self.config.model_copy(update={"alpha": best})
        return self.calibrate(model, forward_loop)

    def _factor(
        self, model: torch.nn.Module, group: _Group, stats: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``s_j = a_j**alpha / w_j**(1 - alpha)`` over the group's shared input channels."""
        linears = [_linear(model, n) for n in group.linears]
        act = torch.stack([stats[n] for n in group.linears]).amax(dim=0)
        wmax = torch.stack([m.weight.detach().abs().amax(dim=0) for m in linears]).amax(dim=0)
        alpha = self.config.alpha
        s = act.clamp(min=1e-8).pow(alpha) / wmax.clamp(min=1e-8).pow(1 - alpha)
        return torch.where(
            (act > 0) & (wmax > 0), s.clamp(min=1e-5, max=1e5), torch.ones_like(s)
        ).float()

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        observed = [(n, m) for n, m in model.named_modules() if isinstance(m, ObservedLinear)]
        if not observed:
            raise PluginError(f"{self.name}: calibrate() was not run; nothing to convert")
        for name, module in observed:
            if self.config.activations == "dynamic":
                model.set_submodule(
                    name, DynamicQuantizedLinear.from_float(module.linear, self.config.reduce_range)
                )
                continue
            if not module.input_observer.seen:
                raise PluginError(f"{self.name}: layer {name!r} saw no calibration data")
            model.set_submodule(
                name,
                QuantizedLinear.from_float(
                    module.linear,
                    module.weight_bits,
                    module.input_observer.range(),
                    module.output_observer.range(),
                    reduce_range=self.config.reduce_range,
                ),
            )
        return model
