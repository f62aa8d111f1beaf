"""Mixed precision: which Linear layers a method quantizes, and to how many bits.

A method's ``Config`` derives from :class:`LayerSelection` to accept two options::

    keep_fp32: ["<first>", "blocks.*.attn.*"]   # glob patterns of module names: left in fp32
    keep_fp32: auto                              # or searched for within the budget
    overrides: {"<last>": 8, "net.3": 8}         # pattern -> weight bits for matching layers

Patterns are :func:`fnmatch.fnmatchcase` globs over qualified module names (``net.1``,
``blocks.0.fc``); ``<first>`` and ``<last>`` name the first and last ``nn.Linear`` in
module order, so one experiment can keep the input and classifier layers of different
models in higher precision. ``keep_fp32`` wins over ``overrides``; among overrides the
first matching pattern (in the order written) wins; every other layer gets the trial's
bits. A pattern that matches no layer of a model is allowed (an experiment may sweep
models with different layer names).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from qatbench.errors import PluginError
from qatbench.methods.base import MethodConfig

FIRST, LAST = "<first>", "<last>"
AUTO = "auto"  # keep_fp32: auto, see qatbench.trial.mixed_precision


class LayerSelection(MethodConfig):
    """Config mixin: ``keep_fp32`` and ``overrides`` (see the module docstring)."""

    #: weight widths an override may ask for; a method narrows it to what it can store.
    override_bits: ClassVar[frozenset[int]] = frozenset({2, 3, 4, 5, 6, 7, 8})

    keep_fp32: list[str] | Literal["auto"] = Field(
        default_factory=list,
        description="glob patterns of layers kept in fp32 (<first>, <last> allowed), or "
        "auto: the fewest most sensitive layers that meet the experiment's budget",
    )
    overrides: dict[str, int] = Field(
        default_factory=dict,
        description="glob pattern -> weight bits for matching Linear layers",
    )

    @model_validator(mode="after")
    def _check_override_bits(self) -> LayerSelection:
        allowed = sorted(self.override_bits)
        for pattern, bits in self.overrides.items():
            if bits not in self.override_bits:
                raise ValueError(
                    f"overrides[{pattern!r}] = {bits}: weight bits must be one of {allowed}"
                )
        return self


def linear_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the model's ``nn.Linear`` layers, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _matches(name: str, pattern: str, names: list[str]) -> bool:
    if pattern == FIRST:
        return bool(names) and name == names[0]
    if pattern == LAST:
        return bool(names) and name == names[-1]
    return fnmatch.fnmatchcase(name, pattern)


def layer_bits(
    names: list[str], config: LayerSelection, default_bits: int
) -> dict[str, int | None]:
    """``name -> bits`` for every layer in ``names`` (``None``: kept in fp32)."""
    if config.keep_fp32 == AUTO:
        raise PluginError(
            "keep_fp32: auto is resolved by the trial, which searches for the layers to keep "
            "within the experiment's budget (qatbench/trial/mixed_precision.py); a method "
            "gets the list it found"
        )
    plan: dict[str, int | None] = {}
    for name in names:
        if any(_matches(name, p, names) for p in config.keep_fp32):
            plan[name] = None
            continue
        plan[name] = next(
            (bits for p, bits in config.overrides.items() if _matches(name, p, names)),
            default_bits,
        )
    return plan


def select_linears(
    model: torch.nn.Module, config: LayerSelection, default_bits: int, skip: tuple[str, ...] = ()
) -> dict[str, int]:
    """``name -> bits`` of the Linear layers to quantize (fp32 and ``skip`` layers left out)."""
    return select_layers(model, config, default_bits, (torch.nn.Linear,), skip)


def select_layers(
    model: torch.nn.Module,
    config: LayerSelection,
    default_bits: int,
    types: tuple[type[torch.nn.Module], ...],
    skip: tuple[str, ...] = (),
) -> dict[str, int]:
    """``name -> bits`` of the layers of ``types`` to quantize, in module order; ``<first>``
    and ``<last>`` then name the first and last of those layers (a CNN's stem conv and its
    classifier)."""
    names = [n for n, m in model.named_modules() if isinstance(m, types)]
    plan = layer_bits(names, config, default_bits)
    return {n: b for n, b in plan.items() if b is not None and n not in skip}


def replace_linears(
    model: torch.nn.Module,
    config: LayerSelection,
    default_bits: int,
    method: str,
    build: Callable[[torch.nn.Linear], torch.nn.Module],
) -> torch.nn.Module:
    """Replace each Linear :func:`select_linears` picks by ``build(linear)``, in place; a
    :class:`~qatbench.errors.PluginError` naming ``method`` when it picks none."""
    targets = select_linears(model, config, default_bits)
    if not targets:
        raise PluginError(f"{method}: the model has no Linear layer to quantize")
    for name in targets:
        linear = model.get_submodule(name)
        assert isinstance(linear, torch.nn.Linear)  # select_linears returns Linear layers
        model.set_submodule(name, build(linear))
    return model
