"""The thin command line: ``run``, ``validate``, ``list``, ``report``, ``merge``, ...

User errors (:class:`QatbenchError`) are caught once, in :func:`main`, and printed as one
line without a traceback. Exit codes: 0 all ran and every expectation held; 1 a trial
failed or an expectation was breached; 2 the command line or an experiment file is wrong.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import warnings
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from qatbench import registry
from qatbench.errors import ConfigError, QatbenchError

if TYPE_CHECKING:
    from qatbench.executor import Executor
    from qatbench.report.compare import CompareResult, Gate
    from qatbench.results import RunRecord
    from qatbench.sweep_outcome import RunOutcome
    from qatbench.sweeps import Shard

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


class ExecutorKind(StrEnum):
    local = "local"
    ray = "ray"


@app.command()
def run(
    files: Annotated[
        list[str],
        typer.Argument(
            help="experiment YAML files or globs; with --resume also a report.json or its folder"
        ),
    ],
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: the YAML's, else ./mlruns)")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="folder for per-run reports")] = Path("reports"),
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="continue a sweep instead of starting one: for a YAML file the newest "
            "sweep under --output-dir that lacks trials of its grid, or the sweep of a given "
            "report.json; only trials missing from it run",
        ),
    ] = False,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="after the sweep, compare it with this one: 'previous' (the experiment's "
            "sweep before this one in MLflow), a report.json, or mlflow:EXPERIMENT[@K]; "
            "exit 1 when a --gate is breached"
        ),
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", "-g", help="gate for --baseline, as for qatbench compare"),
    ] = None,
    executor: Annotated[
        ExecutorKind,
        typer.Option(
            help="where trials run: local (one at a time, each in a fresh worker process) or "
            "ray (Ray tasks on a cluster, several at once; needs the extra qatbench[ray])"
        ),
    ] = ExecutorKind.local,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address for --executor ray (default: RAY_ADDRESS, else a local "
            "Ray instance)"
        ),
    ] = None,
    ray_one_per_node: Annotated[
        bool,
        typer.Option(
            "--ray-one-per-node",
            help="at most one trial per node at a time (latency-critical runs); each node "
            "must offer the custom resource qatbench_node: 1",
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            help="run only shard I/N of each grid (round-robin over its trials), e.g. 1/4 in "
            "a CI matrix job; combine the reports with qatbench merge"
        ),
    ] = None,
) -> None:
    """Run experiments: every model x method x bits x runtime trial, logged and reported."""
    from qatbench.report.compare import parse_gates
    from qatbench.runner import resume_experiment, run_experiment
    from qatbench.sweeps import Shard

    gates = parse_gates(gate or [])
    if gates and baseline is None:
        raise ConfigError("--gate: needs --baseline to compare against")
    part = Shard.parse(shard) if shard is not None else None
    with _executor(executor, ray_address, ray_one_per_node) as pool:
        plans = [_plan(path, output_dir, resume, part) for path in _expand(files)]  # check first
        code = 0
        for path, report in plans:
            if report is None:
                outcome = run_experiment(
                    path,
                    tracking_uri=tracking_uri,
                    output_root=output_dir,
                    executor=pool,
                    shard=part,
                )
            else:
                outcome = resume_experiment(report, tracking_uri=tracking_uri, executor=pool)
            code = max(code, _finish_run(outcome, baseline, gates, tracking_uri))
    raise typer.Exit(code)


@contextlib.contextmanager
def _executor(kind: ExecutorKind, address: str | None, one_per_node: bool) -> Iterator[Executor]:
    """The executor ``run`` hands trials to, closed (a Ray instance it started) at the end."""
    from qatbench.executor import LocalProcessExecutor

    if kind is ExecutorKind.local:
        if address is not None or one_per_node:
            option = "--ray-address" if address is not None else "--ray-one-per-node"
            raise ConfigError(f"{option}: only with --executor ray")
        yield LocalProcessExecutor()
        return
    from qatbench.ray_executor import RayExecutor

    pool = RayExecutor(address, one_per_node=one_per_node)
    try:
        yield pool
    finally:
        pool.close()


def _finish_run(
    outcome: RunOutcome, baseline: str | None, gates: list[Gate], tracking_uri: str | None
) -> int:
    """Print what one sweep did; its exit code (after the baseline comparison, if any)."""
    if outcome.interrupted:
        saved = len(outcome.record.trials)
        total = saved + len(outcome.missing)
        what = "interrupted" if outcome.interrupted == "SIGINT" else "terminated"
        err.print(
            f"{what}: {saved} of {total} trials saved in {outcome.report_json}; "
            f"resume with: qatbench run --resume {outcome.report_json}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(outcome.exit_code)
    finished = sum(t.ok for t in outcome.record.trials)
    shard = outcome.record.experiment.get("shard")
    out.print(
        f"{outcome.record.experiment['name']}"
        f"{f' shard {shard}' if shard else ''}: {finished} finished, "
        f"{len(outcome.failed)} failed"
    )
    for breach in outcome.breaches:
        out.print(f"[red]expectation breached[/] {breach}")
    out.print(f"report.json: {outcome.report_json}")
    out.print(f"report.html: {outcome.report_html}")
    out.print(
        f"mlflow: {outcome.record.tracking.get('uri')} "
        f"(experiment {outcome.record.tracking.get('experiment')}, "
        f"sweep {outcome.record.tracking.get('sweep')})"
    )
    code = outcome.exit_code
    if baseline is not None:
        code = max(code, _judge_against_baseline(outcome.record, baseline, gates, tracking_uri))
    return code


def _judge_against_baseline(
    record: RunRecord, baseline: str, gates: list[Gate], tracking_uri: str | None
) -> int:
    """Compare a finished sweep with its baseline, print the result; 1 on a breach."""
    from qatbench.report import compare as cmp
    from qatbench.report.sources import load_record, load_sweeps, sweep_record

    if baseline == "previous":
        name = record.tracking["experiment"]
        uri, experiment_id, sweeps = load_sweeps(name, tracking_uri or record.tracking["uri"])
        ids = [s.id for s in sweeps]
        here = (
            ids.index(record.tracking["sweep"]) if record.tracking.get("sweep") in ids else len(ids)
        )
        if here == 0:
            out.print(f"baseline: no sweep of {name!r} before this one; nothing to compare")
            return 0
        reference = sweep_record(name, uri, experiment_id, sweeps[here - 1])
        label = f"previous sweep {sweeps[here - 1].id}"
    else:
        reference = load_record(baseline, tracking_uri)
        label = baseline
    result = cmp.compare(reference, record, gates, labels=(label, "this sweep"))
    return _print_comparison(result)


def _print_comparison(result: CompareResult) -> int:
    from qatbench.report import text

    out.print(text.compare_table(result))
    for line in text.compare_summary(result):
        out.print(line, markup=False, highlight=False)
    for line in result.breaches:
        err.print(f"breach: {line}", markup=False, highlight=False, soft_wrap=True)
    return 0 if result.ok else 1


def _plan(
    path: Path, output_dir: Path, resume: bool, shard: Shard | None = None
) -> tuple[Path, Path | None]:
    """Validate one ``run`` argument: (experiment file, report.json to resume or None)."""
    from qatbench import sweeps
    from qatbench.results import RunRecord
    from qatbench.spec import load_experiment

    is_report = path.suffix == ".json" or (path / "report.json").is_file()
    if is_report and not resume:
        raise ConfigError(f"{path}: a report, not an experiment file; continue it with --resume")
    if is_report:
        report = sweeps.report_path(path)
        record = RunRecord.load(report)
        sweeps.stored_spec(record, report)
        ran = record.experiment.get("shard")
        if shard is not None and str(shard) != ran:
            what = f"shard {ran}" if ran else "the whole grid"
            raise ConfigError(f"--shard {shard}: {report} is a sweep of {what}")
        return path, report
    spec = load_experiment(path)
    return path, sweeps.find_unfinished(spec, output_dir, path, shard) if resume else None


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


_SOURCE_HELP = (
    "a report.json, or an MLflow experiment: mlflow:NAME (its latest sweep), "
    "mlflow:NAME@K (sweep K: 0 the first, -1 the latest, -2 the one before) or a bare NAME"
)
_TRACKING_HELP = "MLflow tracking URI for experiment names (default ./mlruns)"


@app.command()
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


@app.command()
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
            "accuracy:-0.5 (an absolute drop of more than 0.5)",
        ),
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help=_TRACKING_HELP)] = None,
    alpha: Annotated[
        float, typer.Option(help="significance level of the Mann-Whitney test on timings")
    ] = 0.01,
    min_effect: Annotated[
        float, typer.Option(help="smallest relative median shift a timing change must have")
    ] = 0.05,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="also write the comparison as HTML")
    ] = None,
) -> None:
    """Compare two runs trial by trial; exit 1 when a gate is breached.

    Timing metrics (latency, throughput, speed-up) breach a gate only when their raw
    samples also differ significantly (Mann-Whitney U); other metrics on the threshold.
    """
    from qatbench.report import compare as cmp
    from qatbench.report.sources import load_record, parse_source

    gates = cmp.parse_gates(gate or [])
    labels = (parse_source(a).label, parse_source(b).label)
    result = cmp.compare(
        load_record(a, tracking_uri),
        load_record(b, tracking_uri),
        gates,
        alpha=alpha,
        min_effect=min_effect,
        labels=labels,
    )
    code = _print_comparison(result)
    if output is not None:
        from qatbench.report.pages import write_compare_html

        out.print(f"compare.html: {write_compare_html(result, output)}")
    raise typer.Exit(code)


@app.command()
def history(
    experiment: Annotated[str, typer.Argument(help="MLflow experiment name")],
    metric: Annotated[str, typer.Option(help="metric to follow, e.g. latency_p50_ms_b1")],
    trial: Annotated[str | None, typer.Option(help="one trial id (default: every trial)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help=_TRACKING_HELP)] = None,
    threshold: Annotated[
        str, typer.Option(help="relative change that counts for metrics without samples")
    ] = "5%",
    alpha: Annotated[
        float, typer.Option(help="significance level of the Mann-Whitney test on timings")
    ] = 0.01,
    min_effect: Annotated[
        float, typer.Option(help="smallest relative median shift a timing change must have")
    ] = 0.05,
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML path")] = Path(
        "history.html"
    ),
) -> None:
    """Chart a metric over the sweeps of an MLflow experiment, significant changes marked."""
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
    out.print(
        f"{len(result.sweeps)} sweeps, {len(result.series)} trials, {changes} significant "
        f"changes of {metric}",
        markup=False,
        highlight=False,
    )
    path = write_history_html(result, output, {"uri": uri, "experiment_id": experiment_id})
    out.print(f"history.html: {path}")


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


@app.command()
def ui(
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store (default sqlite:///mlruns/mlflow.db)")
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: any free port)")] = 5000,
) -> None:
    """Start the MLflow UI over the results store; Ctrl-C stops it."""
    from qatbench import ui as mlflow_ui

    code = mlflow_ui.serve(tracking_uri, host=host, port=port, echo=out.print)
    raise typer.Exit(code)


@app.command()
def sync(
    report: Annotated[Path, typer.Argument(help="a report.json or the run folder holding it")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: the report's)")
    ] = None,
) -> None:
    """Push a report's trials that are missing from MLflow (after an outage); idempotent."""
    from qatbench.report_sync import sync_report

    pushed, present = sync_report(report, tracking_uri=tracking_uri, console=out)
    out.print(f"{report}: {pushed} trials pushed, {present} already in MLflow")


@app.command()
def merge(
    reports: Annotated[
        list[Path], typer.Argument(help="report.json files (or run folders) of the shards")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="folder for the merged report.json and .html")
    ],
) -> None:
    """Merge the reports of a sharded sweep (run --shard I/N) into one report.json + .html."""
    from qatbench import sweeps
    from qatbench.report.html import write_html
    from qatbench.report.merge import load_and_merge

    record = load_and_merge([sweeps.report_path(p) for p in reports])
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
    from qatbench.spec import validate_experiment

    spec = record.experiment.get("spec")
    if not isinstance(spec, dict):
        return []
    have = {t.id for t in record.trials}
    grid = validate_experiment(spec, source="experiment.spec").expand()
    return [t.id for t in grid if t.id not in have]


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
