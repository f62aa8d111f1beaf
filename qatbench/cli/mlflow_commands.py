"""Commands on the MLflow store: ``ui`` serves its UI, ``sync`` pushes a report into it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qatbench.cli.output import out


def ui(
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store (default sqlite:///mlruns/mlflow.db)")
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: any free port)")] = 5000,
) -> None:
    """Start the MLflow UI over the results store; Ctrl-C stops it."""
    from qatbench.cli import ui as mlflow_ui

    code = mlflow_ui.serve(tracking_uri, host=host, port=port, echo=out.print)
    raise typer.Exit(code)


def sync(
    report: Annotated[Path, typer.Argument(help="a report.json or the run folder holding it")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: the report's)")
    ] = None,
) -> None:
    """Push a report's trials that are missing from MLflow (after an outage); idempotent."""
    from qatbench.sweep.sync import sync_report

    pushed, present = sync_report(report, tracking_uri=tracking_uri, console=out)
    out.print(f"{report}: {pushed} trials pushed, {present} already in MLflow")
