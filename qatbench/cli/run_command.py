"""``qatbench run``: check every file first, run or resume each sweep through the chosen
executor, print what it did, and judge it against a baseline when asked."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from qatbench.cli.output import err, expand_globs, out
from qatbench.cli.report_commands import print_comparison
from qatbench.errors import ConfigError

if TYPE_CHECKING:
    from qatbench.report.compare import Gate
    from qatbench.results import RunRecord
    from qatbench.sweep.executor import Executor
    from qatbench.sweep.folders import Shard
    from qatbench.sweep.outcome import RunOutcome


class ExecutorKind(StrEnum):
    local = "local"
    ray = "ray"


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
    from qatbench.sweep.folders import Shard
    from qatbench.sweep.runner import resume_experiment, run_experiment

    gates = parse_gates(gate or [])
    if gates and baseline is None:
        raise ConfigError("--gate: needs --baseline to compare against")
    part = Shard.parse(shard) if shard is not None else None
    with _executor(executor, ray_address, ray_one_per_node) as pool:
        plans = [
            _plan(path, output_dir, resume, part) for path in expand_globs(files)
        ]  # check first
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
    from qatbench.sweep.executor import LocalProcessExecutor

    if kind is ExecutorKind.local:
        if address is not None or one_per_node:
            option = "--ray-address" if address is not None else "--ray-one-per-node"
            raise ConfigError(f"{option}: only with --executor ray")
        yield LocalProcessExecutor()
        return
    from qatbench.sweep.ray_executor import RayExecutor

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
    from qatbench.cli.auto_gates import thresholds_for
    from qatbench.report import compare as cmp
    from qatbench.report.sources import Sweep, load_record, load_sweeps, sweep_record

    history: list[Sweep] | None = None  # the sweeps before this one, for METRIC:auto gates
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
        history = sweeps[:here]
        reference = sweep_record(name, uri, experiment_id, sweeps[here - 1])
        label = f"previous sweep {sweeps[here - 1].id}"
    else:
        reference = load_record(baseline, tracking_uri)
        label = baseline
    thresholds = thresholds_for(record, gates, history, tracking_uri)
    result = cmp.compare(
        reference, record, gates, labels=(label, "this sweep"), thresholds=thresholds
    )
    return print_comparison(result)


def _plan(
    path: Path, output_dir: Path, resume: bool, shard: Shard | None = None
) -> tuple[Path, Path | None]:
    """Validate one ``run`` argument: (experiment file, report.json to resume or None)."""
    from qatbench.results import RunRecord
    from qatbench.spec.schema import load_experiment
    from qatbench.sweep import folders

    is_report = path.suffix == ".json" or (path / "report.json").is_file()
    if is_report and not resume:
        raise ConfigError(f"{path}: a report, not an experiment file; continue it with --resume")
    if is_report:
        report = folders.report_path(path)
        record = RunRecord.load(report)
        folders.stored_spec(record, report)
        ran = record.experiment.get("shard")
        if shard is not None and str(shard) != ran:
            what = f"shard {ran}" if ran else "the whole grid"
            raise ConfigError(f"--shard {shard}: {report} is a sweep of {what}")
        return path, report
    spec = load_experiment(path)
    return path, folders.find_unfinished(spec, output_dir, path, shard) if resume else None
