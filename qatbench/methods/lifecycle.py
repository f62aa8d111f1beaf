"""The one driver of a method's lifecycle, shared by every caller that quantizes a model.

The trial's worker (:mod:`qatbench.trial.lifecycle`), the in-process driver of the pytest
fixtures (:mod:`qatbench.trial.in_process`) and the contract kit
(:mod:`qatbench.methods.contract`) all call :func:`quantize_copy`, so a method meets the
same sequence and the same checks everywhere::

    prepare(copy of fp32) -> calibrate(model, forward_loop)   if capabilities.needs_calibration
        -> train(model, train_loop)                           if capabilities.needs_training
        -> convert(model) -> eval()

The copy is a deep copy, or, for a method whose capabilities promise ``keeps_weights``, a
copy of the module objects that shares fp32's tensors (:func:`~qatbench.models.copies.
shared_copy`): a 1B-parameter fp32 model is then held once, not twice, while the
candidate is made.

Every step's return value must be a module (a step that returns ``None`` is a
:class:`StepError` naming the step) and is the model the next step gets. The caller owns
data and time: it hands in the loops as factories (called only when the step runs) and a
``step`` context manager that times, reports or relabels each phase's errors.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch

from qatbench.errors import PluginError
from qatbench.methods.base import ForwardLoop, QuantMethod, TrainLoop
from qatbench.models.copies import shared_copy

Step = Callable[[str], AbstractContextManager[None]]


class StepError(PluginError):
    """A lifecycle step returned something other than the model."""

    def __init__(self, method: QuantMethod, step: str, returned: object) -> None:
        self.step = step
        super().__init__(
            f"method {method.name!r}: {step}() returned {type(returned).__name__}, not the model"
        )


@contextlib.contextmanager
def untimed(_name: str) -> Iterator[None]:
    yield


def quantize_copy(
    method: QuantMethod,
    fp32: torch.nn.Module,
    forward_loop: Callable[[], ForwardLoop],
    train_loop: Callable[[], TrainLoop],
    step: Step = untimed,
) -> torch.nn.Module:
    """``method``'s converted model of a copy of ``fp32`` (which is left as it was)."""
    caps = method.capabilities
    with step("prepare"):
        copied = shared_copy(fp32) if caps.keeps_weights else copy.deepcopy(fp32)
        model = _checked(method.prepare(copied), method, "prepare")
    if caps.needs_calibration:
        with step("calibrate"):
            model = _checked(method.calibrate(model, forward_loop()), method, "calibrate")
    if caps.needs_training:
        with step("train"):
            model = _checked(method.train(model, train_loop()), method, "train")
    with step("convert"):
        model = _checked(method.convert(model), method, "convert").eval()
    return model


def _checked(model: object, method: QuantMethod, step: str) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise StepError(method, step, model)
    return model
