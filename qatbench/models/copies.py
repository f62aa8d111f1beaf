"""Copies of a module that share its weight storage.

A timing repeat wants a fresh Python object (a module that was trained, evaluated or
compiled against runs measurably differently from a new one), not fresh weights: a deep
copy of a 1B-parameter decoder costs 4 GiB and seconds per repeat. :func:`shared_copy`
copies every module object and shares every tensor it holds (parameters, buffers, packed
integer weights kept as plain attributes), so a copy costs kilobytes and weights tied in
the original (an embedding and the output head) stay tied.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def shared_tensors(module: torch.nn.Module) -> dict[int, torch.Tensor]:
    """``id -> tensor`` of every tensor ``module`` and its submodules hold."""
    found: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for key, value in vars(sub).items():
            if key in ("_parameters", "_buffers"):
                value = list(value.values())
            for tensor in _tensors(value):
                found[id(tensor)] = tensor
    return found


def shared_copy(module: M) -> M:
    """A new ``module`` object tree whose tensors are the original's (no weight is copied).

    Writing into a tensor of the copy writes into the original: give it only to code that
    replaces tensors or modules rather than changing them in place."""
    memo: dict[int, Any] = dict(shared_tensors(module))
    return copy.deepcopy(module, memo)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters and buffers (tied
    weights counted once)."""
    storages: dict[tuple[int, int], int] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses
            storages[(id(tensor), 0)] = tensor.numel() * tensor.element_size()
            continue
        storages[(storage.data_ptr(), storage.device.index or 0)] = storage.nbytes()
    return sum(storages.values())
