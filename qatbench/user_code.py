"""The user's own code, named in an experiment as ``package.module:name``.

Model and data factories, tasks and plugins are imported here, with the permissions of
whoever runs qatbench: an experiment file is code, like a Makefile (docs/reliability.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from qatbench.errors import ConfigError


def resolve_factory(target: str, where: str) -> Any:
    """Import ``package.module:name``; one line naming ``where`` if it cannot be had."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any import failure is their error
        raise ConfigError(
            f"{where}: cannot import {module_name!r}: {exc}".splitlines()[0]
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{where}: {module_name!r} has no callable {attr!r}")
    return factory
