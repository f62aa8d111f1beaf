"""Commands on finished sweeps: ``report``, ``compare``, ``history`` and ``merge``.

Each reads report.json files or an MLflow experiment's sweeps, prints a summary and
writes HTML; ``compare`` exits 1 when a gate is breached.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qatbench.cli.output import err, out

if TYPE_CHECKING:
    from qatbench.report.compare import CompareResult
    from qatbench.results import RunRecord


_SOURCE_HELP = (
    "a report.json, or an MLflow experiment: mlflow:NAME (its latest sweep), "
    "mlflow:NAME@K (sweep K: 0 the first, -1 the latest, -2 the one before) or a bare NAME"
)
_TRACKING_HELP = "MLflow tracking URI for experiment names (default sqlite:///mlruns/mlflow.db)"


def report(
    source: Annotated[str, typer.Argument(help=_SOURCE_HELP)],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="HTML path")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help=_TRACKING_HELP)] = None,
) -> None:
    """Regenerate report.html from a report.json or an MLflow experiment's sweep."""
    from qatbench.report.html import write_html
    from qatbench.report.sources import load_record, parse_source

    parsed = parse_source(source)
    record = load_record(source, tracking_uri)
    if output is None:
        output = (
            parsed.path.with_name("report.html")
            if parsed.path is not None
            else Path(f"{_safe_name(parsed.experiment)}-report.html")
        )
    path = write_html(record, output)
    out.print(f"report.html: {path}")


def _safe_name(name: str) -> str:
    """An experiment name as a file name: anything but letters, digits, ``._-`` becomes ``_``."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


# The significance test's options, shared by compare and history.
Alpha = Annotated[
    float, typer.Option(help="significance level of the Mann-Whitney test on timings")
]
MinEffect = Annotated[
    float, typer.Option(help="smallest relative median shift a timing change must have")
]


def compare(
    a: Annotated[str, typer.Argument(help="the reference run: " + _SOURCE_HELP)],
    b: Annotated[str, typer.Argument(help="the run judged against A, same forms as A")],
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate",
            "-g",
            help="METRIC:CHANGE, repeatable: latency_p50_ms:+5% (a rise of more than 5% "
            "breaches; no _bN suffix = every batch size), throughput_per_s:-5%, "
            "accuracy:-0.5 (an absolute drop of more than 0.5), speedup_vs_fp32:auto (each "
            "trial's threshold from its spread over B's experiment's previous sweeps)",
        ),
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help=_TRACKING_HELP)] = None,
    alpha: Alpha = 0.01,
    min_effect: MinEffect = 0.05,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="also write the comparison as HTML")
    ] = None,
) -> None:
    """Compare two runs trial by trial; exit 1 when a gate is breached.

    Timing metrics (latency, throughput, speed-up) breach a gate only when their samples
    (one per repeat when both runs have them) also differ significantly (Mann-Whitney U);
    other metrics on the threshold.
    """
    from qatbench.cli.auto_gates import thresholds_for
    from qatbench.report import compare as cmp
    from qatbench.report.sources import load_record, parse_source

    gates = cmp.parse_gates(gate or [])
    labels = (parse_source(a).label, parse_source(b).label)
    record_b = load_record(b, tracking_uri)
    result = cmp.compare(
        load_record(a, tracking_uri),
        record_b,
        gates,
        alpha=alpha,
        min_effect=min_effect,
        labels=labels,
        thresholds=thresholds_for(record_b, gates, None, tracking_uri),
    )
    code = print_comparison(result)
    if output is not None:
        from qatbench.report.pages import write_compare_html

        out.print(f"compare.html: {write_compare_html(result, output)}")
    raise typer.Exit(code)


def history(
    experiment: Annotated[str, typer.Argument(help="MLflow experiment name")],
    metric: Annotated[str, typer.Option(help="metric to follow, e.g. latency_p50_ms_b1")],
    trial: Annotated[str | None, typer.Option(help="one trial id (default: every trial)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help=_TRACKING_HELP)] = None,
    threshold: Annotated[
        str, typer.Option(help="relative change that counts for metrics without samples")
    ] = "5%",
    alpha: Alpha = 0.01,
    min_effect: MinEffect = 0.05,
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML path")] = Path(
        "history.html"
    ),
    json_output: Annotated[
        Path | None,
        typer.Option("--json", help="also write the points and steps as JSON, for a job"),
    ] = None,
) -> None:
    """Chart a metric over the sweeps of an MLflow experiment, significant changes and the
    sweeps where a trial's level stepped marked."""
    from qatbench.report import history as hist
    from qatbench.report import text
    from qatbench.report.compare import is_timing
    from qatbench.report.pages import write_history_html
    from qatbench.report.sources import load_sweeps

    if experiment.startswith("mlflow:"):
        experiment = experiment[len("mlflow:") :]
    limit = hist.parse_threshold(threshold)
    uri, experiment_id, sweeps = load_sweeps(
        experiment, tracking_uri, with_results=is_timing(metric)
    )
    result = hist.history(
        experiment,
        sweeps,
        metric,
        trial=trial,
        threshold=limit,
        alpha=alpha,
        min_effect=min_effect,
    )
    changes = sum(len(s.changes) for s in result.series)
    if changes:
        out.print(text.history_table(result))
    for series in result.series:
        for step, at in zip(series.steps, series.step_sweeps(), strict=True):
            out.print(
                f"step: {series.trial}: {metric} {step.before:.4g} -> {step.after:.4g} "
                f"({step.change:+.1%}) from sweep {result.sweeps[at][0]} (#{at})",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    steps = sum(len(s.steps) for s in result.series)
    out.print(
        f"{len(result.sweeps)} sweeps, {len(result.series)} trials, {changes} significant "
        f"changes of {metric}; {steps} steps (change points over the whole series)",
        markup=False,
        highlight=False,
    )
    if json_output is not None:
        import json

        from qatbench.results import write_text_atomic

        write_text_atomic(json_output, json.dumps(hist.history_json(result), indent=2))
        out.print(f"history.json: {json_output}")
    path = write_history_html(result, output, {"uri": uri, "experiment_id": experiment_id})
    out.print(f"history.html: {path}")


def print_comparison(result: CompareResult) -> int:
    """Print a comparison: its table, summary and breaches; 1 on a breach, else 0."""
    from qatbench.report import text

    out.print(text.compare_table(result))
    for line in text.compare_summary(result):
        out.print(line, markup=False, highlight=False)
    for line in result.breaches:
        err.print(f"breach: {line}", markup=False, highlight=False, soft_wrap=True)
    return 0 if result.ok else 1


def merge(
    reports: Annotated[
        list[Path], typer.Argument(help="report.json files (or run folders) of the shards")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="folder for the merged report.json and .html")
    ],
) -> None:
    """Merge the reports of a sharded sweep (run --shard I/N) into one report.json + .html."""
    from qatbench.report.html import write_html
    from qatbench.report.merge import load_and_merge
    from qatbench.sweep import folders

    record = load_and_merge([folders.report_path(p) for p in reports])
    output.mkdir(parents=True, exist_ok=True)
    record.save(output / "report.json")
    write_html(record, output / "report.html")
    failed = sum(not t.ok for t in record.trials)
    out.print(
        f"{record.experiment['name']}: {len(record.trials)} trials merged from "
        f"{len(reports)} reports ({failed} failed)"
    )
    missing = _missing_from_grid(record)
    if missing:
        err.print(
            f"warning: {len(missing)} trial(s) of the grid are in no report: {', '.join(missing)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    out.print(f"report.json: {output / 'report.json'}")
    out.print(f"report.html: {output / 'report.html'}")


def _missing_from_grid(record: RunRecord) -> list[str]:
    """Trial ids of the report's experiment grid that it lacks (none if it has no spec)."""
    from qatbench.spec.schema import validate_experiment

    spec = record.experiment.get("spec")
    if not isinstance(spec, dict):
        return []
    have = {t.id for t in record.trials}
    grid = validate_experiment(spec, source="experiment.spec").expand()
    return [t.id for t in grid if t.id not in have]
