"""``qatbench validate`` and ``qatbench list``: experiment files checked and registered
plugins listed, without building any model."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from qatbench import registry
from qatbench.cli.output import expand_globs, out
from qatbench.cli.quiet import libraries_quiet


def validate(
    files: Annotated[list[str], typer.Argument(help="experiment YAML files or globs")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="skip the estimate of peak memory and disk against what this machine has",
        ),
    ] = False,
    output_dir: Annotated[
        Path, typer.Option(help="where the sweep would write (for the disk estimate)")
    ] = Path("reports"),
) -> None:
    """Check experiment files before any model is trained; list the trials they expand to;
    reject an experiment whose estimated peak memory or disk use this machine lacks."""
    from qatbench.spec.schema import load_experiment

    for path in expand_globs(files):
        with libraries_quiet():
            spec = load_experiment(path)
            trials = spec.expand()
        # imports torch: only once a file is valid (a mistake is reported in a fraction of
        # a second)
        from qatbench.spec.resources import check_fits, shown_bytes

        fits = None if force else check_fits(spec, str(path), output_dir)
        needs = (
            f"; needs about {shown_bytes(fits.memory_bytes)} of memory and "
            f"{shown_bytes(fits.disk_bytes)} of disk"
            if fits is not None
            else ""
        )
        out.print(f"{path}: ok, {len(trials)} trials{needs}")
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
            out.print(name, markup=False, highlight=False)
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
        for index, name in enumerate(registry.methods.names()):
            cls = registry.methods.get(name)
            caps = cls.capabilities
            needs = [
                word
                for word, flag in (
                    ("calibration", caps.needs_calibration),
                    ("training", caps.needs_training),
                )
                if flag
            ]
            out.print(("\n" if index else "") + name, style="bold", markup=False, highlight=False)
            facts = [
                ("bits", " ".join(caps.allowed_bits())),
                (
                    "runtimes",
                    " ".join(r for r in registry.runtimes.names() if _runs(name, _runtime_caps(r))),
                ),
                ("needs", ", ".join(needs) or "-"),
            ]
            for key, value in facts:
                out.print(f"  {key + ':':<10}{value}", markup=False, highlight=False)
            options = cls.Config.model_fields
            if options:
                out.print("  options:", markup=False, highlight=False)
            for key, field in options.items():
                shown = (
                    "(required)"
                    if field.is_required()
                    else option_text(field.get_default(call_default_factory=True))
                )
                out.print(f"    {key}: {shown}", markup=False, highlight=False, soft_wrap=False)
    getattr(registry, kind.value).failed()  # loading warns once per broken plugin


def option_text(value: object) -> str:
    """An option's default as it would be written in YAML (flow style), not a Python repr."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, StrEnum):
        value = value.value
    return json.dumps(value, default=str) if not isinstance(value, str) else value


def _runtime_caps(runtime: str) -> Any:
    return registry.runtimes.get(runtime).capabilities


def _runs(method: str, runtime_caps: Any) -> bool:
    return bool(registry.methods.get(method).capabilities.runs_on(runtime_caps))


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"
