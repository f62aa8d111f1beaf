"""The contract kit for runtimes: what every runtime must do for a trial to run on it.

``check_runtime(MyRuntime)`` loads a small MLP's artifact (the module, or its exported
ONNX graph, as the runtime's capabilities say) and checks that the call agrees with torch,
that ``bind`` gives a zero-argument call the timer can repeat, that ``fresh`` gives a new
instance that agrees too, and that ``integer_fraction`` is None or a share. A failure is
an ``AssertionError`` naming the runtime and what it broke. ``tests/test_runtime_contract.py``
runs it over every registered runtime.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from qatbench.runtimes.base import ONNX_GRAPH, Loaded, Runtime, RuntimeCapabilities
from qatbench.runtimes.onnx_export import export_onnx

SNAKE_CASE = re.compile(r"^[a-z][a-z0-9_]*$")
# Allowed difference from torch, relative to the largest output: fp32 on two engines
# differs by summation order only; bf16 rounds every layer's inputs to 8 significant bits.
RELATIVE = {"fp32": 1e-3, "bf16": 3e-2}


def check_runtime(runtime_cls: Any) -> None:
    """Assert that ``runtime_cls`` honours the Runtime contract (see module docstring)."""
    name = getattr(runtime_cls, "name", None)
    _require(
        isinstance(runtime_cls, type) and issubclass(runtime_cls, Runtime),
        name,
        "is not a subclass of qatbench.runtimes.base.Runtime",
    )
    _require(
        isinstance(name, str) and bool(SNAKE_CASE.match(name)),
        name,
        f"class attribute `name` must be a snake_case string, got {name!r}",
    )
    caps = getattr(runtime_cls, "capabilities", None)
    if not isinstance(caps, RuntimeCapabilities):
        raise AssertionError(
            f"runtime {name!r}: class attribute `capabilities` must be a RuntimeCapabilities"
        )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ).eval()
    inputs = [torch.randn(n, 16) for n in (1, 5)]
    with torch.inference_mode():
        expected = [model(x) for x in inputs]
    runtime = runtime_cls(1)
    with tempfile.TemporaryDirectory(prefix="qatbench-runtime-contract-") as tmp:
        artifact: Any = model
        if caps.artifact == ONNX_GRAPH:
            artifact = export_onnx(model, (inputs[0],), Path(tmp) / "model.onnx")
        loaded = _call(name, "load", lambda: runtime.load(artifact, inputs))
        relative = RELATIVE[caps.precision]
        _agrees(name, "load", loaded, inputs, expected, relative)
        again = _call(name, "fresh", lambda: runtime.fresh(artifact, loaded))
        _agrees(name, "fresh", again, inputs, expected, relative)
        fraction = _call(name, "integer_fraction", lambda: runtime.integer_fraction(artifact))
        _require(
            fraction is None or 0.0 <= float(fraction) <= 1.0,
            name,
            f"integer_fraction() returned {fraction!r}, not None or a share in [0, 1]",
        )


def _call(name: str | None, what: str, fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:
        raise AssertionError(
            f"runtime {name!r}: {what}() raised {type(exc).__name__}: {exc}".splitlines()[0]
        ) from exc


def _agrees(
    name: str | None,
    what: str,
    loaded: Any,
    inputs: list[torch.Tensor],
    expected: list[torch.Tensor],
    relative: float,
) -> None:
    _require(
        isinstance(loaded, Loaded), name, f"{what}() returned {type(loaded).__name__}, not a Loaded"
    )
    for x, want in zip(inputs, expected, strict=True):
        with torch.inference_mode():
            got = loaded.fn(x)
            timed = loaded.bind(x)
            _require(callable(timed), name, f"{what}().bind(x) is not a zero-argument call")
            timed()
        _require(
            isinstance(got, torch.Tensor) and got.shape == want.shape,
            name,
            f"{what}(): output {getattr(got, 'shape', type(got).__name__)} at batch "
            f"{len(x)}; torch gives {tuple(want.shape)}",
        )
        diff = float((got.float() - want).abs().max())
        bound = relative * float(want.abs().max()) + 1e-5
        _require(
            diff <= bound,
            name,
            f"{what}(): differs from torch by {diff:.3g} at batch {len(x)} (> {bound:.3g})",
        )


def _require(condition: bool, name: str | None, message: str) -> None:
    if not condition:
        raise AssertionError(f"runtime {name!r}: {message}")
