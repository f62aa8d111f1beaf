"""Experiment files: the schema, its checks against the registries, its one-line errors.

``schema`` parses YAML into a validated :class:`ExperimentSpec` and expands it into trials;
``checks`` holds what needs the registries (names, capabilities, model factories);
``errors`` turns pydantic's errors into one line; ``expectations`` and ``bitwidth`` parse the
small strings of the grid. The public names are re-exported here.
"""

from qatbench.quant.bitwidth import BitWidth
from qatbench.spec.schema import (
    ExperimentSpec,
    TrialSpec,
    load_experiment,
    validate_experiment,
)

__all__ = ["BitWidth", "ExperimentSpec", "TrialSpec", "load_experiment", "validate_experiment"]
