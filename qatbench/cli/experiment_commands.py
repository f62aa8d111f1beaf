"""``qatbench validate`` and ``qatbench list``: experiment files checked and registered
plugins listed, without building any model."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from qatbench import registry
from qatbench.cli.output import expand_globs, out


def validate(
    files: Annotated[list[str], typer.Argument(help="experiment YAML files or globs")],
) -> None:
    """Check experiment files before any model is trained; list the trials they expand to."""
    from qatbench.spec.schema import load_experiment

    for path in expand_globs(files):
        spec = load_experiment(path)
        trials = spec.expand()
        out.print(f"{path}: ok, {len(trials)} trials")
        for trial in trials:
            out.print(f"  {trial.id}")


class Kind(StrEnum):
    methods = "methods"
    models = "models"


def list_plugins(kind: Annotated[Kind, typer.Argument(help="methods or models")]) -> None:
    """List registered methods (with options and capabilities) or models."""
    if kind is Kind.models:
        for name in registry.models.names():
            out.print(name)
    else:
        table = Table("method", "bits", "calibration", "training", "runtimes", "options")
        for name in registry.methods.names():
            cls = registry.methods.get(name)
            caps = cls.capabilities
            options = ", ".join(
                f"{key}={field.get_default(call_default_factory=True)!r}"
                if not field.is_required()
                else key
                for key, field in cls.Config.model_fields.items()
            )
            table.add_row(
                name,
                " ".join(caps.allowed_bits()),
                _yes(caps.needs_calibration),
                _yes(caps.needs_training),
                " ".join(sorted(caps.runtimes)),
                options or "-",
            )
        out.print(table)
    getattr(registry, kind.value).failed()  # loading warns once per broken plugin


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"
