"""``qatbench pick REPORT... [--budget METRIC:VALUE ...] [--by speedup|size|peak_memory]``.

The best trial within a quality budget per model, runtime and batch size, over existing
reports (several report.json files or a merged one); the decision is
:mod:`qatbench.report.pick`. Exit 0 when every group has a pick, 1 when some group has no
trial within budget (the closest is named), 2 on bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from qatbench.cli.output import out

if TYPE_CHECKING:
    from qatbench.report.pick import Pick


def pick(
    reports: Annotated[list[Path], typer.Argument(help="report.json files (or a merged one)")],
    budget: Annotated[
        list[str] | None,
        typer.Option(
            "--budget",
            help="METRIC:VALUE, the worst value accepted (repeatable); replaces the "
            "experiment's budget:",
        ),
    ] = None,
    by: Annotated[
        str | None,
        typer.Option("--by", help="speedup (default), size or peak_memory"),
    ] = None,
) -> None:
    """The fastest (or smallest) trial within a quality budget, per model, runtime, batch."""
    from qatbench.data.tasks import task_directions
    from qatbench.errors import ConfigError
    from qatbench.measure.directions import quality_metrics
    from qatbench.report.pick import Budget, parse_budget_args, pick, record_budget
    from qatbench.results import RunRecord

    records = [RunRecord.load(p) for p in reports]
    declared = task_directions()
    if budget:
        bounds = parse_budget_args(budget)
        known = quality_metrics(declared)
        for metric in bounds:
            if metric not in known:
                raise ConfigError(
                    f"--budget {metric}: not a quality metric a budget can bound; "
                    f"allowed: {', '.join(sorted(known))}"
                )
    else:
        bounds, _ = record_budget(records[0])
    objective = by or record_budget(records[0])[1]
    trials = [t for r in records for t in r.trials]
    picks = pick(trials, Budget.from_mapping(bounds, declared), objective)
    if not picks:
        raise ConfigError(f"{reports[0]}: no finished trial measured {objective}")
    for p in picks:
        out.print(format_pick(p), highlight=False)
    if not all(p.trial_id for p in picks):
        raise typer.Exit(1)


def format_pick(p: Pick) -> str:
    """One line: where, what was picked (or that nothing is within budget), and why."""
    where = f"{p.model} on {p.runtime}" + (f" at batch {p.batch_size}" if p.batch_size else "")
    if p.trial_id is None:
        return f"[red]no pick[/] {escape(where)}: {escape(p.why)}"
    return f"[green]pick[/] {escape(where)}: [bold]{escape(p.trial_id)}[/]: {escape(p.why)}"


def print_picks(picks: tuple[dict[str, Any], ...]) -> None:
    """The picks of a finished run (report.json ``picks``), one line each."""
    from qatbench.report.pick import Pick

    for data in picks:
        out.print(format_pick(Pick.from_dict(data)), highlight=False, soft_wrap=True)
