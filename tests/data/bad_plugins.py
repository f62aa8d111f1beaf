"""Plugins that break their contract, for tests/test_invalid_corpus.py.

``NoneConvert`` is a method whose ``convert`` returns None instead of the model; it is
installed through an entry point (a dist-info folder the test puts on PYTHONPATH).
``raising_factory`` is a model factory (``bad_plugins:raising_factory``) that raises.
"""

from __future__ import annotations

from typing import Any

import torch

from qatbench.methods.base import Capabilities, QuantMethod


class NoneConvert(QuantMethod):
    """Forgets to return the model from ``convert``."""

    name = "none_convert"
    capabilities = Capabilities(weight_bits=frozenset({8}), activation_bits=frozenset({8}))

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        model.eval()
        return None  # type: ignore[return-value]  # the contract breach under test


def raising_factory(**options: Any) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A model factory that fails, as the user's own code may."""
    raise RuntimeError(f"factory exploded with options {options}")
