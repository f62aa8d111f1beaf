"""``qatbench selftest``: the timer, a workload of known ratio and an A/A comparison checked
on this machine, and its detection power across fresh processes (what two nightlies can
tell apart); the result logged to MLflow, where ``--gate METRIC:auto`` finds it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from qatbench.cli.output import out


def selftest(
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default sqlite:///mlruns/mlflow.db)")
    ] = None,
    processes: Annotated[
        int,
        typer.Option(min=3, help="fresh processes timed for the detection power (20 pairs need 7)"),
    ] = 8,
) -> None:
    """Check the timer, a workload of known ratio and an A/A comparison; measure the
    smallest slowdown this machine detects between nightlies; log all to MLflow."""
    import json
    from dataclasses import asdict

    from qatbench.cli import selftest as st
    from qatbench.measure.env import fingerprint
    from qatbench.measure.power import measure_power
    from qatbench.tracking.tracker import Tracker

    tracker = Tracker(tracking_uri, "qatbench-selftest")
    checks = st.run_selftest()
    out.print("measuring detection power across fresh processes ...")
    power = measure_power(processes)
    table = Table("check", "value", "expected", "result")
    for check in checks:
        table.add_row(
            check.name,
            f"{check.value:.4g}",
            check.expected,
            "[green]pass[/]" if check.passed else "[red]FAIL[/]",
        )
    out.print(table)
    out.print(power.sentence(), markup=False, highlight=False, soft_wrap=True)
    passed = all(c.passed for c in checks)
    env = fingerprint()
    run_id = tracker.log_run(
        "selftest",
        metrics={**st.as_metrics(checks), **st.power_metrics(power)},
        ok=passed,
        tags={
            "qatbench.status": "passed" if passed else "failed",
            "env.cpu_model": str(env.get("cpu_model")),
            "selftest.power": power.sentence(),
        },
        text_artifacts={
            "selftest.json": json.dumps(
                {"checks": st.as_rows(checks), "power": asdict(power), "env": env}, indent=2
            )
        },
    )
    out.print(
        f"selftest {'passed' if passed else 'FAILED'}; mlflow run {run_id} "
        f"(experiment qatbench-selftest, {tracker.uri})"
    )
    raise typer.Exit(0 if passed else 1)
