"""The command line (qatbench.cli), run as the installed console script in a subprocess.

User errors must be one line on stderr starting with ``error:`` and exit 2; a third-party
method installed as its own distribution must be listed and run end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qatbench.results import RunRecord

QATBENCH = Path(sys.executable).with_name("qatbench")
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
INVALID = Path(__file__).resolve().parent / "data" / "invalid"
PLUGIN_PKG = Path(__file__).resolve().parent / "data" / "plugin_pkg"

# invalid file -> the key (or what stands for it) its one error line must name
INVALID_KEYS = {
    "bad_expectation.yaml": "expect[0]",
    "empty.yaml": "empty",
    "misspelt_key.yaml": "runtims",
    "negative_batch.yaml": "data.batch_size",
    "path_name.yaml": "name: ",
    "schema_99.yaml": "schema_version",
    "top_level_list.yaml": "top level",
    "unknown_method.yaml": "methods[1].name",
    "unknown_option.yaml": "methods[1].options.nosuch",
    "unknown_runtime.yaml": "runtimes[1]",
    "unsupported_bits.yaml": "methods[0].bits[0]",
    "yaml_syntax.yaml": "line 4",
    "zero_rounds.yaml": "measure.min_rounds",
    # the reliability corpus (run end to end in tests/test_invalid_corpus.py)
    "alias_bomb.yaml": "expands to more than",
    "binary.yaml": "not a text file",
    "deep_nesting.yaml": "nested too deeply",
    "escape_model_name.yaml": "models[0].name",
    "factory_import_raises.yaml": "models[0].factory",
    "huge_eval_samples.yaml": "data.eval_samples",
    "nan_timing.yaml": "measure.max_time_s",
    "python_tag.yaml": "python/object",
    "dup_key.yaml": "duplicate key at lines 3 and 5",
    "typo_hides_required.yaml": "metods",
    "unsatisfiable_bits.yaml": "bits[1]",
    "bool_batch.yaml": "measure.batch_sizes[0]",
    "input_mismatch.yaml": "models[0] (linear)",
    "file_store_uri.yaml": "tracking.uri",
}


def qatbench(
    *args: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    return subprocess.run(
        [str(QATBENCH), *map(str, args)],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2, nothing on stdout, a single ``error:`` line on stderr, no traceback."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.rstrip("\n")
    assert "\n" not in line, f"more than one line on stderr:\n{proc.stderr}"
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.fixture(scope="module")
def validated_invalid_files() -> dict[str, subprocess.CompletedProcess[str]]:
    """``qatbench validate`` on every invalid fixture (and a missing file), two at a time."""
    paths = [*sorted(INVALID.glob("*.yaml")), INVALID / "missing.yaml"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda p: qatbench("validate", p), paths))
    return {p.name: proc for p, proc in zip(paths, procs, strict=True)}


def test_every_invalid_fixture_has_a_key() -> None:
    assert {p.name for p in INVALID.glob("*.yaml")} == set(INVALID_KEYS)


@pytest.mark.parametrize("name", [*sorted(INVALID_KEYS), "missing.yaml"])
def test_validate_an_invalid_file_prints_one_error_line_and_exits_2(
    name: str,
    validated_invalid_files: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    proc = validated_invalid_files[name]
    key = INVALID_KEYS.get(name, "no such experiment file")
    assert_one_error_line(proc, str(INVALID / name), key)
    assert proc.stdout == ""


def test_validate_quickstart_lists_its_twelve_trials() -> None:
    proc = qatbench("validate", "experiments/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("experiments/quickstart.yaml: ok, 12 trials; needs about ")
    trial_ids = [line.strip() for line in lines[1:]]
    assert len(trial_ids) == 12
    assert "mlp-fp32-fp32-torch" in trial_ids
    assert "tiny_transformer-ptq-w4a8-onnxruntime" in trial_ids
    assert "Traceback" not in proc.stderr


def test_validate_expands_an_unexpanded_glob_and_rejects_one_matching_nothing() -> None:
    proc = qatbench("validate", "experiments/quick*.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("experiments/quickstart.yaml: ok, 12 trials")
    assert_one_error_line(
        qatbench("validate", "experiments/nosuch*.yaml"),
        "experiments/nosuch*.yaml",
        "no experiment file matches",
    )


def test_validate_stops_at_the_first_bad_file_among_several() -> None:
    proc = qatbench("validate", QUICKSTART, INVALID / "unknown_method.yaml")
    assert proc.returncode == 2
    assert "ok, 12 trials" in proc.stdout
    assert proc.stderr.count("error: ") == 1
    assert "Traceback" not in proc.stderr


def test_list_methods_shows_the_builtins() -> None:
    proc = qatbench("list", "methods")
    assert proc.returncode == 0, proc.stderr
    assert "fp32" in proc.stdout and "ptq" in proc.stdout
    assert "w4a8 w8a8" in proc.stdout
    assert proc.stderr == ""


def test_list_models_shows_the_builtins() -> None:
    proc = qatbench("list", "models")
    assert proc.returncode == 0, proc.stderr
    assert {"mlp", "tiny_transformer", "gpt_tiny"} <= set(proc.stdout.split())


@pytest.mark.parametrize(
    "args",
    [["nosuch"], ["list", "gadgets"], ["validate"], ["run", "--no-such-option", "x.yaml"]],
    ids=["unknown-subcommand", "bad-choice", "missing-argument", "unknown-option"],
)
def test_usage_errors_exit_2_without_a_traceback(args: list[str]) -> None:
    proc = qatbench(*args)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2
    assert proc.stderr.strip()


def test_no_arguments_prints_help_without_a_traceback() -> None:
    proc = qatbench()
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "Usage" in proc.stdout + proc.stderr
    assert proc.returncode in (0, 2)


def test_report_on_a_non_json_file_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("<html>not json</html>\n")
    assert_one_error_line(qatbench("report", path), str(path), "not a JSON report")
    assert not (tmp_path / "report.html").exists()


def test_report_on_a_future_schema_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"schema_version": 99, "experiment": {}, "trials": []}))
    assert_one_error_line(qatbench("report", path), str(path), "schema_version 99")


def test_report_on_a_missing_file_is_one_error_line(tmp_path: Path) -> None:
    assert_one_error_line(qatbench("report", tmp_path / "nope.json"), "no such report")


def test_report_regenerates_html(tmp_path: Path, sample_record: RunRecord) -> None:
    source = tmp_path / "report.json"
    sample_record.save(source)
    out = tmp_path / "custom.html"
    proc = qatbench("report", source, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert f"report.html: {out}" in proc.stdout
    assert out.read_text().lstrip().lower().startswith("<!doctype html")


def test_run_validates_before_creating_anything(tmp_path: Path) -> None:
    proc = qatbench(
        "run",
        QUICKSTART,
        INVALID / "unknown_runtime.yaml",
        cwd=tmp_path,
        env={"QATBENCH_CACHE": str(tmp_path / "cache")},
    )
    assert_one_error_line(proc, "unknown_runtime.yaml", "runtimes[1]", "tensorrt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no mlruns/, reports/, cache


# --- third-party plugins -------------------------------------------------------------------


def fake_distribution(site: Path, entry_points: str) -> None:
    """An installed distribution (just its metadata) that declares ``entry_points``."""
    info = site / "qatbench_broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qatbench-broken-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(entry_points)


def test_a_broken_installed_plugin_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    site = tmp_path / "site"
    fake_distribution(site, "[qatbench.methods]\nbroken = nonexistent_mod_xyz:Thing\n")
    env = {"PYTHONPATH": str(site)}
    proc = qatbench("list", "methods", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "fp32" in proc.stdout and "ptq" in proc.stdout
    assert "'broken'" in proc.stderr and "nonexistent_mod_xyz" in proc.stderr

    experiment = tmp_path / "uses_broken.yaml"
    experiment.write_text("name: b\nmodels: [mlp]\nmethods: [broken]\n")
    proc = qatbench("validate", experiment, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert "methods[0].name: method 'broken' is installed but failed to load" in errors[0]

    # an experiment that does not use the broken plugin still validates
    assert qatbench("validate", QUICKSTART, env=env).returncode == 0


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/data/plugin_pkg built and installed into a folder of its own, as pip would."""
    tmp = tmp_path_factory.mktemp("plugin")
    source = tmp / "src"
    shutil.copytree(
        PLUGIN_PKG, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    site = tmp / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert (site / "qatbench_test_plugin.py").is_file()
    return site


@pytest.mark.slow
def test_an_installed_plugin_is_listed(plugin_site: Path) -> None:
    proc = qatbench("list", "methods", env={"PYTHONPATH": str(plugin_site)})
    assert proc.returncode == 0, proc.stderr
    assert "halve" in proc.stdout
    assert "w4 w8" in proc.stdout
    assert "    shrink: 1.0" in proc.stdout
    assert proc.stderr == ""
    # and not without it: nothing of the plugin leaked into this environment
    assert "halve" not in qatbench("list", "methods").stdout


@pytest.mark.slow
def test_an_installed_plugin_runs_end_to_end(plugin_site: Path, tmp_path: Path) -> None:
    store = tmp_path / "mlruns" / "mlflow.db"
    uri = f"sqlite:///{store}"
    (tmp_path / "exp.yaml").write_text(
        textwrap.dedent(f"""\
        name: plugin_run
        models:
          - name: mlp
            options: {{hidden: [32]}}
        methods: [fp32, halve]
        bits: [w4]
        runtimes: [torch]
        artifacts: [onnx]
        data: {{dataset: digits, pretrain_epochs: 1, eval_samples: 64, calibration_samples: 32}}
        measure: {{batch_sizes: [1], max_time_s: 0.2, min_rounds: 5, warmup_s: 0.01,
                   per_layer: false}}
        tracking: {{uri: "{uri}"}}
    """)
    )
    proc = qatbench(
        "run",
        "exp.yaml",
        "--output-dir",
        tmp_path / "reports",
        cwd=tmp_path,
        timeout=300,
        env={"PYTHONPATH": str(plugin_site), "QATBENCH_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plugin_run: 2 finished, 0 failed" in proc.stdout

    reports = list((tmp_path / "reports" / "plugin_run").glob("*/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    trials = {t["id"]: t for t in report["trials"]}
    assert set(trials) == {"mlp-fp32-fp32-torch", "mlp-halve-w4-torch"}
    assert {t["status"] for t in trials.values()} == {"finished"}
    halve = trials["mlp-halve-w4-torch"]
    assert (halve["method"], halve["bits"], halve["error"]) == ("halve", "w4", None)
    # the plugin's convert() ran: 4-bit weights change the outputs; the baseline does not
    assert halve["metrics"]["mse"] > 0
    assert trials["mlp-fp32-fp32-torch"]["metrics"]["mse"] == 0
    # simulated in fp32, so honestly not smaller
    assert halve["metrics"]["compression_ratio"] == pytest.approx(1.0, abs=0.05)

    from mlflow import MlflowClient  # imported here: only this test needs it

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("plugin_run")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_name = {run.info.run_name: run for run in runs}
    assert sorted(by_name) == sorted(trials)
    required = {
        "size_bytes",
        "compression_ratio",
        "latency_p50_ms_b1",
        "throughput_per_s_b1",
        "peak_rss_bytes",
        "mse",
        "accuracy",
    }
    for trial_id, run in by_name.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_id == trials[trial_id]["mlflow_run_id"]
        assert required <= set(run.data.metrics), required - set(run.data.metrics)
        assert run.data.metrics["mse"] == pytest.approx(trials[trial_id]["metrics"]["mse"])
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"trial.json"}
        # The ONNX graph is the run's logged ONNX-flavour model.
        (model,) = client.search_logged_models(
            experiment_ids=[experiment.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
        )
        assert model.name == trial_id
