"""Models with named inputs or structured outputs, adapted to what every phase expects.

Every phase calls a model on positional tensors and compares one output tensor with fp32.
A model whose example inputs are a dict of named tensors is wrapped so that it takes them
positionally (in the dict's order) and passes them on as keywords; a model that returns a
tuple, a dict or a Hugging Face ``ModelOutput`` is wrapped so that it returns the one
tensor compared with fp32, chosen by this rule:

- a tensor: itself;
- a dict or ``ModelOutput``: the entry named by ``models[i].output``, else the first of
  ``logits``, ``last_hidden_state`` and ``pooler_output`` that is present, else the first
  tensor;
- a tuple or list: the entry at index ``models[i].output``, else the first.

The wrapped model is the one methods quantize (their layers are the user's layers, one
level down) and the one exported, whose graph inputs are named after the dict's keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qatbench.errors import ConfigError

PREFERRED_OUTPUTS = ("logits", "last_hidden_state", "pooler_output")


def select_output(out: Any, output: str | int | None, where: str) -> torch.Tensor:
    """The tensor of ``out`` that is compared with fp32 (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        keys = list(out.keys())
        if isinstance(output, str):
            if output not in keys:
                raise ConfigError(f"{where}: output {output!r} names no output; outputs: {keys}")
            chosen = out[output]
        else:
            name = next((k for k in PREFERRED_OUTPUTS if k in keys), None)
            tensors = [k for k in keys if isinstance(out[k], torch.Tensor)]
            if name is None and not tensors:
                raise ConfigError(f"{where}: the model returned no tensor among {keys}")
            chosen = out[name if name is not None else tensors[0]]
    elif isinstance(out, Sequence) and not isinstance(out, str):
        index = output if isinstance(output, int) else 0
        if not -len(out) <= index < len(out):
            raise ConfigError(f"{where}: output {index} names no output of {len(out)}")
        chosen = out[index]
    else:
        raise ConfigError(f"{where}: the model returned {type(out).__name__}, not a tensor")
    if not isinstance(chosen, torch.Tensor):
        raise ConfigError(f"{where}: the chosen output is {type(chosen).__name__}, not a tensor")
    return chosen


class StructuredModel(torch.nn.Module):
    """``model`` called with named inputs given positionally, returning one tensor."""

    def __init__(
        self,
        model: torch.nn.Module,
        input_names: list[str] | None,
        output: str | int | None,
        where: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output = output
        self.where = where
        if input_names:
            self.onnx_input_names = list(input_names)  # read by the ONNX export

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.input_names:
            out = self.model(**dict(zip(self.input_names, inputs, strict=True)))
        else:
            out = self.model(*inputs)
        return select_output(out, self.output, self.where)


def adapt(
    model: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str] | None,
    output: str | int | None,
    where: str,
) -> torch.nn.Module:
    """``model`` as every phase expects it: wrapped only where its inputs are named, its
    output is not a tensor, or ``output`` asks for a choice."""
    if input_names is None and output is None:
        with torch.inference_mode():
            out = model.eval()(*example)
        if isinstance(out, torch.Tensor):
            return model
    adapted = StructuredModel(model, input_names, output, where)
    with torch.inference_mode():
        adapted.eval()(*example)  # a bad `output` or a non-tensor fails here, in build
    return adapted
