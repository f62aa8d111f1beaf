"""The contract kit: checks that a quantization method honours ``methods/base.py``.

``tests/test_method_contract.py`` runs it over every registered method. A plugin author
runs the same checks against their own method from their own test suite::

    import pytest
    from qatbench.methods.contract import check_method
    from my_package.rtn import PerTensorRtn

    @pytest.mark.parametrize("bits", PerTensorRtn.capabilities.allowed_bits())
    def test_contract(bits):
        check_method(PerTensorRtn, bits)

A violation raises ``AssertionError`` whose message names the method, the bit-width and
what was wrong. What is checked, on a tiny seeded MLP (784-32-10) and seeded data:

- ``name`` is snake_case; ``Config`` is a pydantic model that rejects unknown keys, is
  frozen and builds with no options; ``capabilities.allowed_bits()`` is non-empty and
  every label parses and is accepted;
- the lifecycle, driven as the runner drives it (``prepare`` on a copy of the fp32 model,
  ``calibrate`` with the runner's forward loop when ``needs_calibration``, ``train`` with
  the runner's train loop when ``needs_training``, ``convert``): every step returns an
  ``nn.Module``;
- the converted model runs on batches of 1 and 8 and returns finite outputs shaped like
  the fp32 model's;
- when the method runs on ``onnxruntime``, ``export`` writes a file that passes
  ``onnx.checker`` and whose onnxruntime outputs agree with the torch converted model
  within ``0.1 * max|output| + 1e-3``;
- the converted model's ``state_dict`` serializes with ``torch.save`` and loads back with
  ``torch.load(weights_only=True)``.

``check_method(cls, bits, model="cnn")`` runs the same checks on a tiny ``resnet_tiny``
(Conv2d, BatchNorm, a depthwise conv, a Linear classifier) and also checks that a method
whose ``capabilities.layer_types`` does not name ``Conv2d`` leaves every convolution and
BatchNorm as it was: the same class and dtype, and the same values unless the method
trains (fine-tuning moves every weight, quantized or not).

It takes well under five seconds per bit-width and leaves the global RNG state untouched.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from qatbench.methods.base import QuantMethod
from qatbench.methods.lifecycle import Step, StepError, quantize_copy
from qatbench.quant.bitwidth import BitWidth
from qatbench.runtimes.base import ONNX_GRAPH

SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
BATCH_SIZES = (1, 8)
PARITY_RELATIVE, PARITY_ABSOLUTE = 0.1, 1e-3
_SEED = 0
_HIDDEN = (32,)
_SIDE = 28
_CLASSES = 10
_TRAIN, _CALIB, _BATCH = 64, 32, 8
_UNKNOWN_KEY = "__qatbench_contract_unknown_key__"
_CNN_WIDTH = 4
MODELS = frozenset({"mlp", "cnn"})


def check_method(
    method_cls: type[QuantMethod], bits: str | None = None, model: str = "mlp"
) -> None:
    """Check ``method_cls`` against the method contract; raise ``AssertionError`` if broken.

    ``bits`` is one label of ``capabilities.allowed_bits()`` (``"w8a8"``, ``"fp32"``, ...);
    ``None`` checks every allowed label in turn. ``model`` is ``"mlp"`` or ``"cnn"``.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    _check_class(method_cls)
    labels = method_cls.capabilities.allowed_bits()
    if bits is not None:
        _require(
            bits in labels,
            method_cls,
            f"bits {bits!r} is not among capabilities.allowed_bits() {labels}",
        )
        labels = [bits]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as trials run by default; 2 threads on a busy 2-core box crawl
    try:
        with torch.random.fork_rng(devices=[]):
            for label in labels:
                torch.manual_seed(_SEED)
                _check_lifecycle(method_cls, label, model)
    finally:
        torch.set_num_threads(threads)


def _fail(method_cls: Any, message: str, bits: str | None = None) -> AssertionError:
    name = getattr(method_cls, "name", getattr(method_cls, "__name__", repr(method_cls)))
    where = f"method {name!r}" + (f" [{bits}]" if bits else "")
    return AssertionError(f"{where}: {message}")


def _require(condition: bool, method_cls: Any, message: str, bits: str | None = None) -> None:
    if not condition:
        raise _fail(method_cls, message, bits)


def _check_class(method_cls: Any) -> None:
    _require(
        isinstance(method_cls, type) and issubclass(method_cls, QuantMethod),
        method_cls,
        "is not a subclass of qatbench.methods.base.QuantMethod",
    )
    name = getattr(method_cls, "name", None)
    _require(
        isinstance(name, str) and bool(SNAKE_CASE.match(name)),
        method_cls,
        f"class attribute `name` must be a snake_case string, got {name!r}",
    )
    _check_config(method_cls)
    caps = method_cls.capabilities
    labels = caps.allowed_bits()
    _require(bool(labels), method_cls, "capabilities.allowed_bits() is empty")
    for label in labels:
        try:
            parsed = BitWidth.parse(label)
        except ValueError as exc:
            raise _fail(method_cls, f"allowed bit-width {label!r} does not parse: {exc}") from exc
        _require(
            caps.accepts(parsed),
            method_cls,
            f"capabilities.allowed_bits() lists {label!r} but accepts() rejects it",
        )
    _require(
        bool(caps.artifacts), method_cls, "capabilities.artifacts is empty: nothing can run it"
    )


def _check_config(method_cls: Any) -> None:
    config_cls = method_cls.Config
    _require(
        isinstance(config_cls, type) and issubclass(config_cls, BaseModel),
        method_cls,
        f"Config must be a pydantic BaseModel subclass, got {config_cls!r}",
    )
    settings = config_cls.model_config
    _require(
        settings.get("extra") == "forbid",
        method_cls,
        "Config must reject unknown keys (model_config extra='forbid'; "
        "subclass qatbench.methods.base.MethodConfig)",
    )
    _require(
        bool(settings.get("frozen")),
        method_cls,
        "Config must be frozen (model_config frozen=True; subclass MethodConfig)",
    )
    try:
        config = config_cls()
    except ValidationError as exc:
        raise _fail(method_cls, f"Config() must build with no options: {exc}") from exc
    try:
        config_cls.model_validate({_UNKNOWN_KEY: 1})
    except ValidationError:
        pass
    else:
        raise _fail(method_cls, "Config accepted an unknown key")
    for field in config_cls.model_fields:
        try:
            setattr(config, field, getattr(config, field))
        except (ValidationError, TypeError, AttributeError):
            pass
        else:
            raise _fail(method_cls, f"Config field {field!r} can be assigned: not frozen")
        break  # one field shows it


def _tiny_model(model: str) -> torch.nn.Module:
    if model == "cnn":
        from qatbench.models.cnn import ResNetTiny, ResNetTinyConfig

        cnn = ResNetTiny(ResNetTinyConfig(width=_CNN_WIDTH))
        _randomize_batchnorm(cnn)
        return cnn.eval()
    from qatbench.models.mlp import Mlp, MlpConfig

    return Mlp(MlpConfig(hidden=_HIDDEN)).eval()


def _randomize_batchnorm(model: torch.nn.Module) -> None:
    """Statistics and affine terms away from identity, so folding them is not a no-op."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
                bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)


def _tiny_data(model: str = "mlp") -> tuple[Any, torch.Tensor]:
    from qatbench.data.datasets import TaskData

    gen = torch.Generator().manual_seed(_SEED)
    shape = (1, _SIDE, _SIDE) if model == "cnn" else (_SIDE, _SIDE)
    train_x = torch.randn((_TRAIN, *shape), generator=gen)
    train_y = torch.randint(0, _CLASSES, (_TRAIN,), generator=gen)
    eval_x = torch.randn((max(BATCH_SIZES), *shape), generator=gen)
    data = TaskData(
        name="contract",
        train_x=train_x,
        train_y=train_y,
        calib_x=train_x[:_CALIB],
        eval_x=eval_x,
        eval_y=None,
        num_classes=_CLASSES,
    )
    return data, eval_x


def _steps(method_cls: Any, bits: str) -> Step:
    """The driver's ``step``: a step that raises fails the contract naming the step."""

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        try:
            yield
        except StepError as exc:
            raise _fail(method_cls, str(exc).split(": ", 1)[-1], bits) from exc
        except Exception as exc:
            raise _fail(
                method_cls, f"{name}() raised {type(exc).__name__}: {exc}".splitlines()[0], bits
            ) from exc

    return step


def _check_lifecycle(method_cls: Any, bits: str, model_name: str = "mlp") -> None:
    from qatbench.data.training import forward_loop, train_loop

    fp32 = _tiny_model(model_name)
    data, eval_x = _tiny_data(model_name)
    with torch.inference_mode():
        reference = {n: fp32(eval_x[:n]) for n in BATCH_SIZES}

    method = method_cls(method_cls.Config(), BitWidth.parse(bits))
    caps = method_cls.capabilities
    before = {k: v.detach().clone() for k, v in fp32.state_dict().items()}
    converted = quantize_copy(  # the driver of every trial, so the kit tests what runs
        method,
        fp32,
        forward_loop=lambda: forward_loop(data, _BATCH),
        train_loop=lambda: train_loop(data, _BATCH, _SEED),
        step=_steps(method_cls, bits),
    )
    changed = [k for k, v in fp32.state_dict().items() if not torch.equal(v, before[k])]
    _require(
        not changed,
        method_cls,
        f"quantizing changed the fp32 model's {changed[:1]}"
        + (
            " (capabilities.keeps_weights: its copy shares fp32's storage)"
            if caps.keeps_weights
            else ""
        ),
        bits,
    )

    outputs = {}
    for n in BATCH_SIZES:
        try:
            with torch.inference_mode():
                out = converted(eval_x[:n])
        except Exception as exc:
            raise _fail(
                method_cls,
                f"the converted model failed on a batch of {n}: "
                f"{type(exc).__name__}: {exc}".splitlines()[0],
                bits,
            ) from exc
        _require(
            isinstance(out, torch.Tensor),
            method_cls,
            f"the converted model returned {type(out).__name__} on a batch of {n}, not a tensor",
            bits,
        )
        _require(
            out.shape == reference[n].shape,
            method_cls,
            f"output shape {tuple(out.shape)} at batch {n}; fp32 gives {tuple(reference[n].shape)}",
            bits,
        )
        _require(
            bool(torch.isfinite(out).all()),
            method_cls,
            f"the converted model returned non-finite values at batch {n}",
            bits,
        )
        outputs[n] = out

    if ONNX_GRAPH in caps.artifacts:
        _check_export(method, converted, eval_x, outputs, bits)
    _check_state_dict(method_cls, converted, bits)
    if "Conv2d" not in caps.layer_types:
        _check_untouched_convs(method_cls, fp32, converted, bits)


_CONV_AND_NORM = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)


def _check_untouched_convs(
    method_cls: Any, fp32: torch.nn.Module, converted: torch.nn.Module, bits: str
) -> None:
    """A method that does not declare convolutions leaves them and their BatchNorm as is."""
    for name, layer in fp32.named_modules():
        if not isinstance(layer, _CONV_AND_NORM):
            continue
        try:
            after = converted.get_submodule(name)
        except AttributeError:
            after = None
        trains = method_cls.capabilities.needs_training
        same = type(after) is type(layer) and all(
            a.dtype == b.dtype and (trains or torch.equal(a, b))
            for a, b in zip(layer.state_dict().values(), after.state_dict().values(), strict=True)
        )
        _require(
            same,
            method_cls,
            f"capabilities.layer_types {sorted(method_cls.capabilities.layer_types)} names no "
            f"Conv2d, but {type(layer).__name__} {name!r} was changed",
            bits,
        )


def _check_export(
    method: QuantMethod,
    converted: torch.nn.Module,
    eval_x: torch.Tensor,
    outputs: dict[int, torch.Tensor],
    bits: str,
) -> None:
    from qatbench.runtimes import onnxruntime as ortrt
    from qatbench.runtimes.onnx_export import check_onnx

    cls = type(method)
    example = (eval_x[:1].clone(),)
    with tempfile.TemporaryDirectory(prefix="qatbench-contract-") as tmp:
        path = Path(tmp) / "model.onnx"
        returned = _export(method, converted, example, path, bits)
        written = Path(returned) if isinstance(returned, str | Path) else path
        _require(written.is_file(), cls, f"export() wrote no file at {written}", bits)
        try:
            check_onnx(written)
        except Exception as exc:
            raise _fail(
                cls, f"the exported graph fails onnx.checker: {exc}".splitlines()[0], bits
            ) from exc
        try:
            run = ortrt.as_callable(ortrt.make_session(written, 1))
            ort_out = {n: run(eval_x[:n].contiguous()) for n in outputs}
        except Exception as exc:
            raise _fail(
                cls,
                f"onnxruntime cannot run the exported graph: {type(exc).__name__}: "
                f"{exc}".splitlines()[0],
                bits,
            ) from exc
    # One rounding step of an activation below 8 bits is coarse (a4: 1/15 of a layer's input
    # range), and fbgemm and onnxruntime may round a value on a boundary differently.
    activation = BitWidth.parse(bits).activation
    relative = PARITY_RELATIVE * (2 if activation is not None and activation < 8 else 1)
    for n, torch_out in outputs.items():
        got = ort_out[n]
        _require(
            tuple(got.shape) == tuple(torch_out.shape),
            cls,
            f"onnxruntime output shape {tuple(got.shape)} at batch {n}; torch gives "
            f"{tuple(torch_out.shape)}",
            bits,
        )
        diff = float((got.float() - torch_out.float()).abs().max())
        bound = relative * float(torch_out.abs().max()) + PARITY_ABSOLUTE
        _require(
            diff <= bound,
            cls,
            f"onnxruntime disagrees with the torch model at batch {n}: max abs diff "
            f"{diff:.3g} > {bound:.3g}",
            bits,
        )


def _export(
    method: QuantMethod,
    converted: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    bits: str,
) -> object:
    try:
        return method.export(converted, example, path)
    except Exception as exc:
        raise _fail(
            type(method), f"export() raised {type(exc).__name__}: {exc}".splitlines()[0], bits
        ) from exc


def _check_state_dict(method_cls: Any, converted: torch.nn.Module, bits: str) -> None:
    buffer = io.BytesIO()
    try:
        torch.save(converted.state_dict(), buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise _fail(
            method_cls,
            "the converted model's state_dict does not round-trip through "
            f"torch.save/torch.load(weights_only=True): {reason}",
            bits,
        ) from exc
