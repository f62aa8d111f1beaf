"""qatbench: benchmarking and experiment tracking for neural-network quantization.

Importing the package is cheap; the public names load their modules on first use.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("qatbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

_EXPORTS = {
    "QatbenchError": "qatbench.errors",
    "ConfigError": "qatbench.errors",
    "BitWidth": "qatbench.quant.bitwidth",
    "ExperimentSpec": "qatbench.spec.schema",
    "TrialSpec": "qatbench.spec.schema",
    "load_experiment": "qatbench.spec.schema",
    "TrialResult": "qatbench.results",
    "RunRecord": "qatbench.results",
    "QuantMethod": "qatbench.methods.base",
    "MethodConfig": "qatbench.methods.base",
    "Capabilities": "qatbench.methods.base",
    "run_trial": "qatbench.trial.lifecycle",
    "run_experiment": "qatbench.sweep.runner",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qatbench' has no attribute {name!r}")
