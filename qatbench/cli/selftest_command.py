"""``qatbench selftest``: the timer, a workload of known ratio and an A/A comparison checked
on this machine; the result logged to MLflow."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from qatbench.cli.output import out


def selftest(
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default sqlite:///mlruns/mlflow.db)")
    ] = None,
) -> None:
    """Check the timer, a workload of known ratio and an A/A comparison; log to MLflow."""
    import json

    from qatbench.cli import selftest as st
    from qatbench.measure.env import fingerprint
    from qatbench.tracking.tracker import Tracker

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
