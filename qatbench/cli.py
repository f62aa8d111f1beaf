"""The thin command line: ``run``, ``validate``, ``list``, ``report``.

User errors (:class:`QatbenchError`) are caught once, in :func:`main`, and printed as one
line without a traceback. Exit codes: 0 all ran and every expectation held; 1 a trial
failed or an expectation was breached; 2 the command line or an experiment file is wrong.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from qatbench import registry
from qatbench.errors import ConfigError, QatbenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Benchmark quantization methods from YAML experiments; results go to MLflow.",
)
out = Console(soft_wrap=True)  # paths are never broken across lines
err = Console(stderr=True)


def _expand(patterns: list[str]) -> list[Path]:
    """Files named or matched by glob patterns (for shells that leave them unexpanded)."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"{pattern}: no experiment file matches")
        paths += [Path(m) for m in matches]
    return paths


@app.command()
def run(
    files: Annotated[list[str], typer.Argument(help="experiment YAML files or globs")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: the YAML's, else ./mlruns)")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="folder for per-run reports")] = Path("reports"),
) -> None:
    """Run experiments: every model x method x bits x runtime trial, logged and reported."""
    from qatbench.runner import run_experiment

    paths = _expand(files)
    for path in paths:  # validate everything before running anything
        from qatbench.spec import load_experiment

        load_experiment(path)
    code = 0
    for path in paths:
        outcome = run_experiment(path, tracking_uri=tracking_uri, output_root=output_dir)
        finished = sum(t.ok for t in outcome.record.trials)
        out.print(
            f"{outcome.record.experiment['name']}: {finished} finished, "
            f"{len(outcome.failed)} failed"
        )
        for breach in outcome.breaches:
            out.print(f"[red]expectation breached[/] {breach}")
        out.print(f"report.json: {outcome.report_json}")
        out.print(f"report.html: {outcome.report_html}")
        out.print(
            f"mlflow: {outcome.record.tracking.get('uri')} "
            f"(experiment {outcome.record.tracking.get('experiment')})"
        )
        code = max(code, outcome.exit_code)
    raise typer.Exit(code)


@app.command()
def validate(
    files: Annotated[list[str], typer.Argument(help="experiment YAML files or globs")],
) -> None:
    """Check experiment files without building any model; list the trials they expand to."""
    from qatbench.spec import load_experiment

    for path in _expand(files):
        spec = load_experiment(path)
        trials = spec.expand()
        out.print(f"{path}: ok, {len(trials)} trials")
        for trial in trials:
            out.print(f"  {trial.id}")


class Kind(StrEnum):
    methods = "methods"
    models = "models"


@app.command("list")
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


@app.command()
def report(
    source: Annotated[Path, typer.Argument(help="a report.json")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="HTML path")] = None,
) -> None:
    """Regenerate report.html from a report.json."""
    from qatbench.report.html import write_html
    from qatbench.results import RunRecord

    record = RunRecord.load(source)
    path = write_html(record, output or source.with_name("report.html"))
    out.print(f"report.html: {path}")


@app.command()
def selftest(
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default ./mlruns)")
    ] = None,
) -> None:
    """Check the timer, a workload of known ratio and an A/A comparison; log to MLflow."""
    import json

    from qatbench import selftest as st
    from qatbench.measure.env import fingerprint
    from qatbench.tracking import Tracker

    tracker = Tracker(tracking_uri, "qatbench-selftest")
    checks = st.run_selftest()
    table = Table("check", "value", "expected", "result")
    for check in checks:
        table.add_row(
            check.name,
            f"{check.value:.4g}",
            check.expected,
            "[green]pass[/]" if check.passed else "[red]FAIL[/]",
        )
    out.print(table)
    passed = all(c.passed for c in checks)
    env = fingerprint()
    run_id = tracker.log_run(
        "selftest",
        metrics=st.as_metrics(checks),
        ok=passed,
        tags={
            "qatbench.status": "passed" if passed else "failed",
            "env.cpu_model": str(env.get("cpu_model")),
        },
        text_artifacts={
            "selftest.json": json.dumps({"checks": st.as_rows(checks), "env": env}, indent=2)
        },
    )
    out.print(
        f"selftest {'passed' if passed else 'FAILED'}; mlflow run {run_id} "
        f"(experiment qatbench-selftest, {tracker.uri})"
    )
    raise typer.Exit(0 if passed else 1)


def _show_warning(
    message: Warning | str, category: type[Warning], *_args: object, **_kw: object
) -> None:
    """Warnings as one line each (a broken plugin, an unlogged trial), no source lines."""
    err.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point: the one place user errors are caught."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    warnings.showwarning = _show_warning
    try:
        code = app(standalone_mode=False)
    except QatbenchError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: typer's own message, exit 2
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            err.print(f"error: {exc}", markup=False)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted", markup=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
