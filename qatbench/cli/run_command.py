"""``qatbench run``: check every file first, run or resume each sweep through the chosen
executor, print what it did, and judge it against a baseline when asked."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from qatbench.cli.output import err, expand_globs, out
from qatbench.cli.pick_command import print_picks
from qatbench.cli.quiet import ThirdPartyLog, libraries_quiet, third_party_to
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
        str | None,
        typer.Option(
            help="MLflow tracking URI (default: the YAML's, else sqlite:///mlruns/mlflow.db)"
        ),
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
            "last full sweep before this one in MLflow; partial pytest runs are skipped), a "
            "report.json, or mlflow:EXPERIMENT[@K] (any sweep, partial ones too); exit 1 "
            "when a --gate is breached"
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
            help="Ray cluster address for --executor ray (default: RAY_ADDRESS, else a fresh "
            "local Ray instance on 127.0.0.1, stopped at the end)"
        ),
    ] = None,
    ray_connect_timeout: Annotated[
        float | None,
        typer.Option(
            help="seconds to wait for --ray-address to accept this driver before exiting 2 "
            "[default: 30]"
        ),
    ] = None,
    ray_trials_per_node: Annotated[
        int | None,
        typer.Option(
            help="trials (timing passes) a Ray node runs at once, each on cores of its own "
            "[default: 1, so a measurement has its node to itself]"
        ),
    ] = None,
    ray_one_per_node: Annotated[
        bool,
        typer.Option("--ray-one-per-node", hidden=True, help="the default; kept for old scripts"),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            help="run only shard I/N of each grid (round-robin over its trials), e.g. 1/4 in "
            "a CI matrix job; combine the reports with qatbench merge"
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="show what the libraries underneath print (warnings, progress bars, MLflow's "
            "messages) instead of writing it to qatbench.log in the sweep folder",
        ),
    ] = False,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide",
            help="results table with every column (each batch size, latency, error, ONNX) at "
            "full width, instead of the key figures in 100 columns",
        ),
    ] = False,
    sweep_id: Annotated[
        str | None,
        typer.Option(
            help="the MLflow sweep id to log under (default: derived from --run-key, else "
            "new); shards given the same one are one sweep to compare, history and merge"
        ),
    ] = None,
    run_key: Annotated[
        str | None,
        typer.Option(
            help="a key naming this run of the experiment, e.g. a CI pipeline id: the sweep "
            "id is EXPERIMENT-KEY, the same for every shard of it"
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="run even where the estimated peak memory or disk use exceeds what this "
            "machine has",
        ),
    ] = False,
) -> None:
    """Run experiments: every model x method x bits x runtime trial, logged and reported."""
    from qatbench.report.compare import parse_gates
    from qatbench.sweep import folders
    from qatbench.sweep.folders import Shard
    from qatbench.sweep.runner import resume_experiment, run_experiment

    gates = parse_gates(gate or [])
    if gates and baseline is None:
        raise ConfigError("--gate: needs --baseline to compare against")
    part = Shard.parse(shard) if shard is not None else None
    if sweep_id is not None and run_key is not None:
        raise ConfigError("--sweep-id: give either --sweep-id or --run-key, not both")
    if resume and (sweep_id is not None or run_key is not None):
        option = "--sweep-id" if sweep_id is not None else "--run-key"
        raise ConfigError(f"{option}: a resumed sweep keeps its own sweep id")
    folders.sweep_id("experiment", sweep_id, run_key)  # a malformed one fails before any run
    ray_options = RayOptions(ray_address, ray_connect_timeout, ray_trials_per_node)
    if executor is ExecutorKind.local:
        ray_options.refuse_without_ray(ray_one_per_node)
    # the fit check imports the plugins named (torchao's and torch's import-time lines)
    with contextlib.nullcontext() if verbose else libraries_quiet():
        plans = [_plan(path, output_dir, resume, part, force) for path in expand_globs(files)]
    with _executor(executor, ray_options) as pool:
        code = 0
        with _quiet_unless(verbose, output_dir) as log:
            for path, report in plans:
                if report is None:
                    outcome = run_experiment(
                        path,
                        tracking_uri=tracking_uri,
                        output_root=output_dir,
                        executor=pool,
                        shard=part,
                        sweep_id=sweep_id,
                        run_key=run_key,
                    )
                else:
                    outcome = resume_experiment(report, tracking_uri=tracking_uri, executor=pool)
                if log is not None and not log.moved:
                    log.move_to(outcome.report_json.parent)
                code = max(code, _finish_run(outcome, baseline, gates, tracking_uri, wide))
    raise typer.Exit(code)


@dataclass(frozen=True)
class RayOptions:
    """The ``--ray-*`` options of ``run``, None where not given."""

    address: str | None
    connect_timeout_s: float | None
    trials_per_node: int | None

    def refuse_without_ray(self, one_per_node: bool) -> None:
        """A one-line error for any ``--ray-*`` option given with the local executor."""
        given = {
            "--ray-address": self.address is not None,
            "--ray-connect-timeout": self.connect_timeout_s is not None,
            "--ray-trials-per-node": self.trials_per_node is not None,
            "--ray-one-per-node": one_per_node,
        }
        for option, present in given.items():
            if present:
                raise ConfigError(f"{option}: only with --executor ray")


@contextlib.contextmanager
def _quiet_unless(verbose: bool, output_dir: Path) -> Iterator[ThirdPartyLog | None]:
    """Third-party output to a log (see qatbench.cli.quiet) unless ``verbose``."""
    if verbose:
        yield None
        return
    log = ThirdPartyLog(output_dir)
    try:
        with third_party_to(log):
            yield log
    finally:
        log.close()


@contextlib.contextmanager
def _executor(kind: ExecutorKind, ray: RayOptions) -> Iterator[Executor]:
    """The executor ``run`` hands trials to, connected before any sweep folder is made,
    and closed (a Ray instance it started) at the end."""
    from qatbench.sweep.executor import LocalProcessExecutor

    if kind is ExecutorKind.local:
        yield LocalProcessExecutor()
        return
    from qatbench.sweep.ray_executor import CONNECT_TIMEOUT_S, RayExecutor

    pool = RayExecutor(
        ray.address,
        connect_timeout_s=(
            CONNECT_TIMEOUT_S if ray.connect_timeout_s is None else ray.connect_timeout_s
        ),
        per_node=1 if ray.trials_per_node is None else ray.trials_per_node,
    )
    try:
        pool.connect()  # a wrong address fails here, before a report exists
        yield pool
    finally:
        pool.close()


def _finish_run(
    outcome: RunOutcome,
    baseline: str | None,
    gates: list[Gate],
    tracking_uri: str | None,
    wide: bool = False,
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
    print_results(outcome.record, wide)
    finished = sum(t.ok for t in outcome.record.trials)
    shard = outcome.record.experiment.get("shard")
    out.print(
        f"{outcome.record.experiment['name']}"
        f"{f' shard {shard}' if shard else ''}: {finished} finished, "
        f"{len(outcome.failed)} failed"
    )
    print_picks(outcome.record.picks)  # the answer first (issue 25)
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


def print_results(record: RunRecord, wide: bool = False) -> None:
    """The sweep's results table on stdout: 100 columns at most (a log gets 100), or
    every column at full width with ``wide``."""
    from qatbench.report.summary import NARROW_WIDTH, results_table

    if not record.trials:
        return
    if out.is_terminal:
        width = out.width if wide else min(out.width, NARROW_WIDTH)
    else:
        width = 4 * NARROW_WIDTH if wide else NARROW_WIDTH
    # A console of its own: print(width=) can only narrow ``out``, and ``out`` stays as it is.
    console = Console(
        file=out.file,
        width=width,
        force_terminal=out.is_terminal,
        color_system=out.color_system,  # type: ignore[arg-type]  # None: no colour
        soft_wrap=False,
    )
    console.print(results_table(record, wide=wide))


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
        # A partial sweep (pytest --qatbench -k ...) is no baseline: name it as mlflow:NAME@K.
        before = [s for s in sweeps[:here] if not s.partial]
        if not before:
            partial = f" ({here} partial, not compared)" if here else ""
            word = "full sweep" if here else "sweep"
            out.print(
                f"baseline: no {word} of {name!r} before this one{partial}; nothing to compare"
            )
            return 0
        history = sweeps[:here]
        reference = sweep_record(name, uri, experiment_id, before[-1])
        skipped = here - sweeps.index(before[-1]) - 1  # every sweep between is partial
        label = f"previous sweep {before[-1].id}" + (
            f" (skipping {skipped} partial)" if skipped else ""
        )
    else:
        reference = load_record(baseline, tracking_uri)
        label = baseline
    thresholds = thresholds_for(record, gates, history, tracking_uri)
    result = cmp.compare(
        reference, record, gates, labels=(label, "this sweep"), thresholds=thresholds
    )
    return print_comparison(result)


def _plan(
    path: Path, output_dir: Path, resume: bool, shard: Shard | None = None, force: bool = False
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
    if not force:  # before anything is built: the sweep would not fit this machine
        from qatbench.spec.resources import check_fits  # imports torch: a valid file only

        check_fits(spec, str(path), output_dir)
    return path, folders.find_unfinished(spec, output_dir, path, shard) if resume else None
