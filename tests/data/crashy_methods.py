"""Methods that crash their worker process, for tests/test_executor.py.

A trial runs in a worker forked from the executor's forkserver, whose method registry knows
only the entry points: a method registered in the test process is not visible there. The
worker imports this module through the model factory (``data.crashy_methods:build``) in its
``build`` phase, before it looks the method up, so ``build`` registers the methods in the
worker. Importing the module registers nothing, so collecting tests does not leak these
methods into other tests' view of the registry.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import torch

from qatbench import registry
from qatbench.methods.base import Capabilities, QuantMethod
from qatbench.models.mlp import build_mlp

_CAPS = Capabilities(weight_bits=frozenset({8}), activation_bits=frozenset({8}))


class AbortInConvert(QuantMethod):
    """Dies with SIGABRT, as a native library's failed assertion would."""

    name = "abort_in_convert"
    capabilities = _CAPS

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from the test
        os.abort()


class SleepInConvert(QuantMethod):
    """Never finishes within the test's timeout."""

    name = "sleep_in_convert"
    capabilities = _CAPS

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        time.sleep(120)
        return model


class SleepOnceInConvert(QuantMethod):
    """Hangs the first time (writing its pid to the file named by QATBENCH_SLEEP_ONCE, so
    a test can kill what runs it), and converts at once when run again."""

    name = "sleep_once_in_convert"
    capabilities = _CAPS

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        marker = os.environ["QATBENCH_SLEEP_ONCE"]
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return model
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(120)
        return model


METHODS: tuple[type[QuantMethod], ...] = (AbortInConvert, SleepInConvert, SleepOnceInConvert)


def register() -> None:
    for cls in METHODS:
        registry.methods.register(cls.name, cls)


def unregister() -> None:
    for cls in METHODS:
        registry.methods.unregister(cls.name)


def build(**options: Any) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The seed MLP factory, registering this module's methods in the calling process."""
    register()
    return build_mlp(**options)
