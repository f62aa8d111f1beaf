"""``qatbench validate`` and ``qatbench list``: experiment files checked and registered
plugins listed, without building any model."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

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
    runtimes = "runtimes"


def list_plugins(
    kind: Annotated[Kind, typer.Argument(help="methods, models or runtimes")],
) -> None:
    """List registered methods (with options and capabilities), models or runtimes."""
    if kind is Kind.models:
        for name in registry.models.names():
            out.print(name)
    elif kind is Kind.runtimes:
        runtimes = Table("runtime", "runs", "compiles", "methods", "what it is")
        for name in registry.runtimes.names():
            runtime = registry.runtimes.get(name)
            caps = runtime.capabilities
            able = [m for m in registry.methods.names() if _runs(m, caps)]
            runtimes.add_row(
                name,
                caps.artifact.replace("_", " "),
                _yes(caps.compiles),
                str(len(able)),
                runtime.unavailable_reason() or runtime.description,
            )
        out.print(runtimes)
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
                " ".join(r for r in registry.runtimes.names() if _runs(name, _runtime_caps(r))),
                options or "-",
            )
        out.print(table)
    getattr(registry, kind.value).failed()  # loading warns once per broken plugin


def _runtime_caps(runtime: str) -> Any:
    return registry.runtimes.get(runtime).capabilities


def _runs(method: str, runtime_caps: Any) -> bool:
    return bool(registry.methods.get(method).capabilities.runs_on(runtime_caps))


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"
