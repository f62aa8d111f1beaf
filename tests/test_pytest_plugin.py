"""The pytest plugin: YAML experiments as items (opt-in), one-line failures, JUnit XML,
the session's reports and MLflow runs, and the qatbench / quantized_benchmark fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qatbench.results import RunRecord

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
INVALID = Path(__file__).parent / "data" / "invalid"

# Two trials of a 32-wide MLP, measured as briefly as the spec allows.
TINY = """\
schema_version: 1
name: tiny
models:
  - name: mlp
    options: {{hidden: [32]}}
methods:
  - fp32
  - name: ptq
    expect: [{ptq_expect}]
bits: [w8a8]
runtimes: [torch]
data: {{pretrain_epochs: 1, eval_samples: 64, calibration_samples: 32}}
measure: {{batch_sizes: [1], max_time_s: 0.2, min_rounds: 5, warmup_s: 0.01, per_layer: false}}
timeout_s: {timeout_s}
expect: ["cosine > 0.9"]
"""
TINY_IDS = ["mlp-fp32-fp32-torch", "mlp-ptq-w8a8-torch"]
TINY_SETTINGS = (
    "model_options={'hidden': [32]}, pretrain_epochs=1, eval_samples=64, "
    "calibration_samples=32, batch_sizes=[1], max_time_s=0.2, min_rounds=5, warmup_s=0.01, "
    "per_layer=False"
)


def tiny(ptq_expect: str = '"compression_ratio > 1"', timeout_s: float = 300) -> str:
    return TINY.format(ptq_expect=ptq_expect, timeout_s=timeout_s)


@pytest.fixture(scope="module")
def _imported(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Import what the plugin and these tests use before any pytester run: pytester forgets
    the modules imported while it is in use, so the next test would import a second copy of
    qatbench's classes and registered methods (that the first copies do not recognise) and
    of SQLAlchemy (whose compiled parts break when imported twice)."""
    import qatbench.pytest_plugin.fixtures
    import qatbench.report.html
    import qatbench.sweep.executor
    import qatbench.sweep.runner
    import qatbench.trial.lifecycle  # noqa: F401  # imported for the side effect above
    from qatbench import registry
    from qatbench.tracking.queries import search_trials
    from qatbench.tracking.store import default_uri
    from qatbench.tracking.tracker import Tracker

    registry.methods.names()
    registry.models.names()
    store = default_uri(tmp_path_factory.mktemp("store"))
    Tracker(store, "imports")
    search_trials(store, "imports")  # the tests read their runs back like this


@pytest.fixture
def env(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, _imported: None
) -> pytest.Pytester:
    """A pytester folder whose trials cache their pretrained weights inside it."""
    monkeypatch.setenv("QATBENCH_CACHE", str(pytester.path / "cache"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("COLUMNS", "200")  # summary lines whole, not cut at 80 columns
    # The inner runs are plain pytest runs even when this suite runs under pytest-xdist
    # (pytest-benchmark turns itself off when it sees an xdist worker).
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    return pytester


# Plugins that cost seconds per in-process run here and play no part in these tests:
# pytest's unraisable-exception check (repeated gc.collect() over torch's and mlflow's
# heap) and hypothesis (which re-imports, and so re-compiles, its internals every run).
QUIET = ("-p", "no:unraisableexception", "-p", "no:hypothesispytest")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """An in-process pytest run (see QUIET), for runs that collect but run no trial."""
    return pytester.runpytest(*args, *QUIET)


def run_apart(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """A pytest run in a fresh interpreter, for runs that log to MLflow: an in-process run
    forgets the modules it imported, and SQLAlchemy's compiled parts cannot be imported a
    second time into the same process."""
    return pytester.runpytest_subprocess(*args, *QUIET, timeout=900)


def _collected(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if "::" in line and " " not in line.strip()]


# --- opt-in ---------------------------------------------------------------------------------


def test_without_opt_in_yaml_files_are_not_collected(env: pytest.Pytester) -> None:
    env.makefile(".yaml", tiny=tiny())
    env.makepyfile(test_plain="def test_ok():\n    pass\n")
    named = run(env, "tiny.yaml", "--collect-only", "-q")
    assert "tiny.yaml::" not in named.stdout.str()
    assert named.ret != 0  # pytest: nothing collects a YAML file
    everything = run(env, "--collect-only", "-q")
    assert _collected(everything) == ["test_plain.py::test_ok"]


def test_opt_in_never_searches_folders_for_yaml(env: pytest.Pytester) -> None:
    """An invalid file in a folder (like tests/data/invalid) stays untouched with the flag."""
    env.mkdir("data")
    (env.path / "data" / "broken.yaml").write_text((INVALID / "unknown_method.yaml").read_text())
    env.makepyfile(test_plain="def test_ok():\n    pass\n")
    result = run(env, "--qatbench", "--collect-only", "-q")
    assert result.ret == 0
    assert _collected(result) == ["test_plain.py::test_ok"]
    assert "--qatbench: no experiment file named" in result.stdout.str()


# --- collection -----------------------------------------------------------------------------


def test_each_trial_is_an_item_named_by_its_trial_id(env: pytest.Pytester) -> None:
    env.makefile(".yaml", tiny=tiny())
    result = run(env, "--qatbench", "tiny.yaml", "--collect-only", "-q")
    assert result.ret == 0
    assert _collected(result) == [f"tiny.yaml::{tid}" for tid in TINY_IDS]


def test_k_selects_trials_by_any_axis(env: pytest.Pytester) -> None:
    env.makefile(".yaml", tiny=tiny())
    result = run(env, "--qatbench", "tiny.yaml", "--collect-only", "-q", "-k", "ptq")
    assert _collected(result) == ["tiny.yaml::mlp-ptq-w8a8-torch"]
    result = run(env, "--qatbench", "tiny.yaml", "--collect-only", "-q", "-k", "not w8a8")
    assert _collected(result) == ["tiny.yaml::mlp-fp32-fp32-torch"]
    result = run(env, "--qatbench", "tiny.yaml", "--collect-only", "-q", "-m", "qatbench")
    assert len(_collected(result)) == 2


def test_a_node_id_selects_one_trial(env: pytest.Pytester) -> None:
    env.makefile(".yaml", tiny=tiny())
    result = run(env, "--qatbench", "tiny.yaml::mlp-ptq-w8a8-torch", "--collect-only", "-q")
    assert _collected(result) == ["tiny.yaml::mlp-ptq-w8a8-torch"]


def test_the_ini_option_opts_in_and_joins_a_run_without_paths(env: pytest.Pytester) -> None:
    env.mkdir("experiments")
    (env.path / "experiments" / "tiny.yaml").write_text(tiny())
    env.mkdir("tests")
    (env.path / "tests" / "test_plain.py").write_text("def test_ok():\n    pass\n")
    env.makeini("[pytest]\ntestpaths = tests\nqatbench_experiments = experiments/*.yaml\n")
    result = run(env, "--collect-only", "-q")
    assert _collected(result) == [
        "tests/test_plain.py::test_ok",
        *(f"experiments/tiny.yaml::{tid}" for tid in TINY_IDS),
    ]
    # Paths on the command line replace the listed experiments, as they replace testpaths.
    only_tests = run(env, "tests", "--collect-only", "-q")
    assert _collected(only_tests) == ["tests/test_plain.py::test_ok"]
    # Named explicitly, without --qatbench: the ini option is the opt-in.
    named = run(env, "experiments/tiny.yaml", "--collect-only", "-q")
    assert len(_collected(named)) == 2


def test_an_invalid_experiment_is_one_clean_collection_error(env: pytest.Pytester) -> None:
    source = (INVALID / "unknown_method.yaml").read_text()
    env.makefile(".yaml", bad=source)
    result = run(env, "--qatbench", "bad.yaml")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    message = "bad.yaml: methods[1].name: unknown method 'gptq_xyz'; known methods:"
    section = out.split("ERROR collecting bad.yaml", 1)[1].split("=====", 1)[0]
    body = [line for line in section.splitlines() if line.strip("_ ")]
    assert len(body) == 1 and body[0].startswith(message)
    assert "Traceback" not in out and "schema.py" not in out
    result.stdout.fnmatch_lines(["ERROR bad.yaml - bad.yaml: methods[[]1[]].name: unknown*"])


@pytest.mark.slow  # a fresh interpreter that imports torch: about 10 s here
def test_the_readme_command_collects_the_twelve_quickstart_trials() -> None:
    """README: ``pytest --qatbench experiments/quickstart.yaml`` from the repository root."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--qatbench",
            "experiments/quickstart.yaml",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    items = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(items) == 12
    assert "experiments/quickstart.yaml::mlp-ptq-w4a8-onnxruntime" in items


# --- running trials -------------------------------------------------------------------------


@pytest.mark.slow
def test_trials_run_log_and_breach_with_one_line(env: pytest.Pytester) -> None:
    env.makefile(".yaml", tiny=tiny(ptq_expect='"mse < 0.0000001"'))
    result = run_apart(env, "--qatbench", "tiny.yaml", "--junitxml=junit.xml", "-rf")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "Traceback" not in out
    result.stdout.fnmatch_lines(
        [
            "tiny.yaml .F*",
            "mse * >= 1e-07 (mlp-ptq-w8a8-torch)",
            "FAILED tiny.yaml::mlp-ptq-w8a8-torch - mse * >= 1e-07 (mlp-ptq-w8a8-torch)",
        ]
    )

    cases = {c.get("name"): c for c in ET.parse(env.path / "junit.xml").iter("testcase")}
    assert sorted(cases) == TINY_IDS
    for trial_id, case in cases.items():
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert props["trial_id"] == trial_id and props["status"] == "finished"
        assert len(props["mlflow_run_id"]) == 32
        assert float(props["compression_ratio"]) > 0 and "latency_p50_ms_b1" in props
    failure = cases["mlp-ptq-w8a8-torch"].find("failure")
    assert failure is not None and failure.get("message", "").startswith("mse ")
    assert failure.get("message", "").endswith(">= 1e-07 (mlp-ptq-w8a8-torch)")
    assert cases["mlp-fp32-fp32-torch"].find("failure") is None

    # The session's report.json holds both trials with their MLflow runs, report.html too.
    (report,) = (env.path / "reports" / "tiny").glob("*/report.json")
    record = RunRecord.load(report)
    assert [t.id for t in record.trials] == TINY_IDS
    assert all(t.mlflow_run_id for t in record.trials)
    assert report.with_name("report.html").stat().st_size > 1000
    from qatbench.tracking.queries import search_trials
    from qatbench.tracking.store import default_uri

    runs = search_trials(default_uri(env.path), "tiny")
    assert sorted(r["run_name"] for r in runs) == TINY_IDS
    assert {r["tags"]["qatbench.source"] for r in runs} == {"pytest"}
    assert {r["run_id"] for r in runs} == {t.mlflow_run_id for t in record.trials}

    # --lf keeps only the breached trial.
    last_failed = run(env, "--qatbench", "tiny.yaml", "--lf", "--collect-only", "-q")
    assert _collected(last_failed) == ["tiny.yaml::mlp-ptq-w8a8-torch"]


@pytest.mark.slow  # starts the worker forkserver (imports torch and onnxruntime)
def test_a_failed_trial_is_one_line_and_x_stops_there(env: pytest.Pytester) -> None:
    """A trial that cannot finish in time fails naming its phase; -x skips the rest."""
    env.makefile(".yaml", tiny=tiny(timeout_s=0.01))
    result = run_apart(env, "--qatbench", "tiny.yaml", "-x")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "failed in *: timed out after 0.01 s (mlp-fp32-fp32-torch)",
            "*stopping after 1 failures*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_the_same_expectations_decide_qatbench_run(tmp_path: Path) -> None:
    """pytest items and ``qatbench run`` share sweep.outcome.check_expectations: one record, one
    verdict (the run command exits 1 on what fails an item)."""
    from qatbench.pytest_plugin.trial_results import TrialFailed, fail_on
    from qatbench.results import TrialResult
    from qatbench.spec.schema import validate_experiment
    from qatbench.sweep.outcome import check_expectations

    path = tmp_path / "tiny.yaml"
    path.write_text(tiny(ptq_expect='"mse < 0.05"'))
    import yaml

    spec = validate_experiment(yaml.safe_load(path.read_text()), source=str(path))
    trial = spec.expand()[1]
    result = TrialResult(
        id=trial.id,
        model="mlp",
        method="ptq",
        bits="w8a8",
        runtime="torch",
        status="finished",
        metrics={"mse": 0.083, "cosine": 0.99},
    )
    record = RunRecord(experiment={}, created="", env={}, trials=(result,))
    assert check_expectations(spec, record) == ["mse 0.083 >= 0.05 (mlp-ptq-w8a8-torch)"]
    with pytest.raises(TrialFailed, match=r"^mse 0\.083 >= 0\.05 \(mlp-ptq-w8a8-torch\)$"):
        fail_on(spec, result)


# --- fixtures -------------------------------------------------------------------------------


@pytest.mark.slow
def test_fixtures_run_a_trial_and_a_benchmark_and_log_both(env: pytest.Pytester) -> None:
    env.makepyfile(
        test_bench=f"""
        def test_trial(qatbench):
            result = qatbench.run("mlp", "fp32", runtime="torch", isolated=False,
                                  expect=["cosine > 0.99"], {TINY_SETTINGS})
            assert result.ok and result.metrics["mse"] == 0.0

        def test_breach(qatbench_trial):
            qatbench_trial("mlp", "fp32", isolated=False, expect=["sqnr_db < 1"],
                           {TINY_SETTINGS})

        def test_bad_setting(qatbench):
            qatbench.run("mlp", "fp32", warmup=1)

        def test_latency(quantized_benchmark):
            model, x = quantized_benchmark.quantize("mlp", "ptq", bits="w8a8", batch=4,
                                                    {TINY_SETTINGS})
            out = quantized_benchmark(model, x)
            assert out.shape == (4, 10)
        """
    )
    result = run_apart(
        env,
        "--benchmark-json=bench.json",
        "--benchmark-autosave",
        f"--benchmark-storage=file://{env.path / 'bench-store'}",
        "--benchmark-min-rounds=5",
        "--benchmark-max-time=0.05",
        "--junitxml=junit.xml",
    )
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "FAILED test_bench.py::test_breach - Failed: sqnr_db * >= 1 (mlp-fp32-fp32-torch)",
            "FAILED test_bench.py::test_bad_setting - Failed: *unknown setting 'warmup'*",
        ]
    )
    assert "Traceback" not in result.stdout.str()
    assert "During handling" not in result.stdout.str()

    bench = json.loads((env.path / "bench.json").read_text())
    (entry,) = bench["benchmarks"]
    assert entry["name"] == "test_latency"
    assert entry["extra_info"]["trial_id"] == "mlp-ptq-w8a8-torch"
    assert entry["extra_info"]["batch"] == 4 and entry["extra_info"]["cosine"] > 0.9
    assert entry["stats"]["rounds"] >= 5
    assert list((env.path / "bench-store").rglob("*.json"))  # --benchmark-autosave

    from qatbench.tracking.queries import search_trials
    from qatbench.tracking.store import default_uri

    runs = {r["run_name"]: r for r in search_trials(default_uri(env.path), "test_bench")}
    assert set(runs) == {"mlp-fp32-fp32-torch", "mlp-ptq-w8a8-torch"}
    timing = runs["mlp-ptq-w8a8-torch"]
    assert timing["tags"]["qatbench.kind"] == "benchmark"
    assert timing["tags"]["qatbench.pytest.nodeid"] == "test_bench.py::test_latency"
    stats = entry["stats"]
    for key in ("min", "max", "mean", "median", "stddev"):
        assert timing["metrics"][f"bench_{key}_ms"] == pytest.approx(stats[key] * 1e3)
    assert timing["metrics"]["bench_rounds"] == stats["rounds"]
    assert "sqnr_db" in timing["metrics"]

    cases = {c.get("name"): c for c in ET.parse(env.path / "junit.xml").iter("testcase")}
    props = {p.get("name") for p in cases["test_trial"].iter("property")}
    assert {"mlp-fp32-fp32-torch.mlflow_run_id", "mlp-fp32-fp32-torch.mse"} <= props
    (report,) = (env.path / "reports" / "test_bench").glob("*/report.json")
    assert [t.id for t in RunRecord.load(report).trials] == ["mlp-fp32-fp32-torch"]


# --- partial runs (issue 24) ----------------------------------------------------------------


@pytest.mark.slow
def test_a_partial_run_is_tagged_partial_and_prints_its_results(env: pytest.Pytester) -> None:
    """``-k`` runs part of the grid: its runs and report say so, so that ``qatbench run
    --baseline previous`` does not compare a full sweep with it; the summary has the table."""
    env.makefile(".yaml", tiny=tiny())
    result = run_apart(env, "--qatbench", "tiny.yaml", "-k", "fp32")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "speed-up b1 [95% CI]" in out and "fp32 · torch" in out  # the results table
    assert "(partial: 1 of 2 trials; not a --baseline previous)" in out
    (report,) = (env.path / "reports" / "tiny").glob("*/report.json")
    assert RunRecord.load(report).experiment["partial"] == "1 of 2 trials"
    from qatbench.report.sources import sweeps_from_runs
    from qatbench.tracking.queries import search_trials
    from qatbench.tracking.store import default_uri

    runs = search_trials(default_uri(env.path), "tiny")
    assert [r["tags"].get("qatbench.partial") for r in runs] == ["true"]
    (sweep,) = sweeps_from_runs(runs)
    assert sweep.partial


@pytest.mark.parametrize(
    ("selection", "partial"), [((), {}), (("-k", "ptq"), {"tiny": (1, 2)})], ids=["all", "-k"]
)
def test_only_a_selection_of_part_of_the_grid_is_partial(
    env: pytest.Pytester, selection: tuple[str, ...], partial: dict[str, tuple[int, int]]
) -> None:
    from qatbench.pytest_plugin.session import SESSION_STATE

    env.makefile(".yaml", tiny=tiny())
    sessions = []

    class Keep:
        def pytest_collection_finish(self, session: pytest.Session) -> None:
            sessions.append(session)

    env.runpytest(
        "--qatbench", "tiny.yaml", "--collect-only", "-q", *selection, *QUIET, plugins=[Keep()]
    )
    (session,) = sessions
    assert session.config.stash[SESSION_STATE].partial == partial
