"""Model inputs of any structure: one tensor, several positional tensors, or named ones.

A model factory returns ``(model, example_inputs)`` where ``example_inputs`` is a tensor,
a tuple of tensors (positional arguments) or a dict of named tensors (keyword arguments),
of any dtype (int64 token ids, bool masks, float pixels), the batch first in every one.
A single tensor stays a plain tensor all the way through (the fast path of the zoo);
several become :class:`Inputs`, positional, which slices, splits and repeats along the
batch like a tensor does, so datasets, loops and timing handle both alike. Named inputs
are made positional once, when the model is built, by an adapter that calls the model
with keywords (:mod:`qatbench.models.adapters`). :func:`call` is how
every phase calls a model, a compiled function or a runtime on a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qatbench.errors import ConfigError


@dataclass(frozen=True)
class Inputs:
    """A batch of several positional model inputs, each with the batch first."""

    args: tuple[torch.Tensor, ...]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        return Inputs(tuple(fn(t) for t in self.args))

    def __len__(self) -> int:
        return len(self.args[0])

    def __getitem__(self, index: Any) -> Inputs:
        return self.map(lambda t: t[index])

    def split(self, size: int) -> list[Inputs]:
        return [self[i : i + size] for i in range(0, len(self), size)]

    def contiguous(self) -> Inputs:
        return self.map(torch.Tensor.contiguous)

    def clone(self) -> Inputs:
        return self.map(torch.Tensor.clone)

    def describe(self) -> str:
        return "(" + ", ".join(_described(t) for t in self.args) + ")"


Batch = torch.Tensor | Inputs  # what a dataset split, a loop or a timed call holds


def from_example(example: Any, where: str) -> tuple[Batch, list[str] | None]:
    """The factory's example as a :data:`Batch`, and the names of named inputs (a dict's
    keys, in order; the model is then called with them as keywords, see
    :mod:`qatbench.models.adapters`). One line naming ``where`` if the example is not a
    tensor, a tuple/list of tensors or a dict of named tensors."""
    if isinstance(example, torch.Tensor):
        return example, None
    if isinstance(example, Mapping) and example:
        if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in example.items()):
            values = list(example.values())
            return (values[0] if len(values) == 1 else Inputs(tuple(values))), list(example)
    elif (
        isinstance(example, Sequence)
        and example
        and all(isinstance(t, torch.Tensor) for t in example)
    ):
        return (example[0] if len(example) == 1 else Inputs(tuple(example))), None
    raise ConfigError(
        f"{where}: example inputs must be a tensor, a tuple of tensors or a dict of named "
        f"tensors (batch first), got {_shown(example)}"
    )


def call(fn: Callable[..., Any], batch: Batch) -> Any:
    """``fn`` on a batch: one tensor as the argument, :class:`Inputs` spread."""
    return fn(*batch.args) if isinstance(batch, Inputs) else fn(batch)


def batch_of(batch: Batch, n: int) -> Batch:
    """``n`` samples of ``batch``, repeated if it has fewer."""
    reps = -(-n // len(batch))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:n].contiguous()

    return batch.map(grow) if isinstance(batch, Inputs) else grow(batch)


def as_batch(example: tuple[torch.Tensor, ...]) -> Batch:
    """Positional example inputs as a batch: the tensor itself when there is one."""
    return example[0] if len(example) == 1 else Inputs(tuple(example))


def tensors_of(batch: Batch) -> tuple[torch.Tensor, ...]:
    return batch.args if isinstance(batch, Inputs) else (batch,)


def describe(batch: Batch) -> str:
    return batch.describe() if isinstance(batch, Inputs) else _described(batch)


def _described(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _shown(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a dict of " + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return f"a {type(value).__name__} of " + ", ".join(type(v).__name__ for v in value)
    return type(value).__name__
