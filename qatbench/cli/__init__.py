"""The thin command line: ``run``, ``validate``, ``list``, ``report``, ``merge``, ...

This module builds the Typer app from the command modules beside it and is the console
script's entry point (:func:`main`). User errors (:class:`QatbenchError`) are caught once,
in :func:`main`, and printed as one line without a traceback. Exit codes: 0 all ran and
every expectation held; 1 a trial failed or an expectation was breached; 2 the command
line or an experiment file is wrong.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Annotated

import typer

from qatbench.cli import (
    experiment_commands,
    mlflow_commands,
    pick_command,
    quiet,
    report_commands,
    run_command,
    selftest_command,
)
from qatbench.cli.output import err, out
from qatbench.errors import QatbenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: brackets stay literal, flags show no type
    help="Benchmark quantization methods from YAML experiments; results go to MLflow.",
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("qatbench")
        except PackageNotFoundError:  # run from a source tree that is not installed
            text = "unknown (not installed)"
        out.print(f"qatbench {text}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print qatbench's version and exit.",
        ),
    ] = False,
) -> None:
    """Benchmark quantization methods from YAML experiments; results go to MLflow."""


app.command()(run_command.run)
app.command()(experiment_commands.validate)
app.command("list")(experiment_commands.list_plugins)
app.command()(report_commands.report)
app.command()(report_commands.compare)
app.command()(report_commands.history)
app.command()(selftest_command.selftest)
app.command()(mlflow_commands.ui)
app.command()(mlflow_commands.sync)
app.command()(report_commands.merge)
app.command()(pick_command.pick)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    *_args: object,
    **_kw: object,
) -> None:
    """Warnings as one line each (a broken plugin, an unlogged trial), no source lines;
    those of other libraries to the sweep's log while ``run`` is quiet."""
    log = quiet.active_log()
    if log is not None and not quiet.is_own_warning(filename):
        log.write(f"{filename}:{lineno}: {category.__name__}: {message}")
        return
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
