"""``qatbench run --executor ray``: trials as Ray tasks, logged to a shared MLflow server.

A local Ray instance started as the executor starts one (127.0.0.1 only, two CPUs) stands
in for a cluster, and a real ``mlflow server`` for the shared tracking store. The
quickstart grid, with short budgets, must come out of Ray as it comes out of the local
executor, each trial logged once; a crashing trial must be a failed result naming its
phase; Ctrl-C must cancel what is still running.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from data.mlflow_server import free_port, mlflow_server
from data.sweep_support import QATBENCH, all_runs, cli_env, qatbench, sweep_runs

from qatbench.errors import ConfigError
from qatbench.results import TrialResult
from qatbench.spec.schema import load_experiment
from qatbench.sweep.executor import Job, LocalProcessExecutor
from qatbench.sweep.runner import run_experiment

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
TESTS_DIR = Path(__file__).parent
CRASHY = {"name": "crashy", "factory": "data.crashy_methods:build", "options": {"hidden": [32]}}
SHORT_DATA = {"pretrain_epochs": 3, "eval_samples": 128, "calibration_samples": 64}
SHORT_MEASURE = {
    "batch_sizes": [1],
    "max_time_s": 0.2,
    "min_rounds": 5,
    "warmup_s": 0.01,
    "per_layer": False,
}


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    from qatbench.sweep.ray_instance import start_local

    instance = start_local(ray, num_cpus=2)
    try:
        yield ray
    finally:
        instance.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One data and pretraining cache for the module's trials (workers get QATBENCH_*)."""
    folder = tmp_path_factory.getbasetemp() / "ray-cache"
    monkeypatch.setenv("QATBENCH_CACHE", str(folder))
    return folder


@pytest.fixture
def crashy() -> Iterator[Any]:
    if str(TESTS_DIR) not in sys.path:
        pytest.skip("tests/ is not on sys.path (pytest run with --import-mode=importlib?)")
    from data import crashy_methods

    crashy_methods.register()
    yield crashy_methods
    crashy_methods.unregister()


def _experiment(path: Path, name: str, **changes: Any) -> Path:
    """The quickstart grid with short budgets (same trial ids), as ``name``."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["name"] = name
    data["data"].update(SHORT_DATA)
    data["measure"].update(SHORT_MEASURE)
    data["timeout_s"] = 120
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_a_quickstart_slice_on_ray_matches_the_local_executor(
    ray_local: Any, server: str, cache: Path, tmp_path: Path
) -> None:
    from qatbench.sweep.ray_executor import RayExecutor

    # the quickstart's two runtimes and both methods on one model and bit-width: the
    # results, folders and runs of the two executors are compared, not the grid's size
    exp = _experiment(tmp_path / "quickstart.yaml", "quickstart_ray", models=["mlp"], bits=["w8a8"])
    grid = [t.id for t in load_experiment(exp).expand()]
    assert len(grid) == 4
    reports = tmp_path / "reports"
    local = run_experiment(
        exp, tracking_uri=server, output_root=reports, executor=LocalProcessExecutor()
    )
    executor = RayExecutor(per_node=2)  # the results, not their latency, are compared here
    remote = run_experiment(exp, tracking_uri=server, output_root=reports, executor=executor)
    executor.close()
    assert ray_local.is_initialized()  # a Ray it did not start is left alone

    statuses = {(t.id, t.status) for t in local.record.trials}
    assert {(t.id, t.status) for t in remote.record.trials} == statuses
    assert sorted(t.id for t in remote.record.trials) == sorted(grid)
    assert remote.report_json.with_name("report.html").is_file()

    # each sweep logged each trial exactly once to the shared server
    for outcome in (local, remote):
        runs = sweep_runs(server, "quickstart_ray", outcome.record.tracking["sweep"])
        assert sorted(r.info.run_name for r in runs) == sorted(grid)
        assert {r.info.run_id for r in runs} == {t.mlflow_run_id for t in outcome.record.trials}
    assert len(all_runs(server, "quickstart_ray")) == 2 * len(grid)

    # artifacts came back as bytes and lie under the driver's trial folders
    run_dir = remote.report_json.parent
    for trial in remote.record.trials:
        if trial.ok and trial.runtime == "onnxruntime":  # torch trials export nothing unasked
            onnx = Path(trial.artifacts["onnx"])
            assert onnx.parent == run_dir / "trials" / trial.id and onnx.stat().st_size > 0
        assert (run_dir / "trials" / trial.id / "result.json").is_file()
        env = trial.details["env"]
        assert env["hostname"] == socket.gethostname()
        assert env["node_id"] == ray_local.get_runtime_context().get_node_id()
        assert int(env["cores"]) in os.sched_getaffinity(0)  # 1 thread, pinned to 1 core
        assert trial.details["retries"] == 0


def test_a_crashing_trial_on_ray_is_a_failed_result_naming_its_phase(
    ray_local: Any, crashy: Any, cache: Path, tmp_path: Path
) -> None:
    from qatbench.sweep.ray_executor import RayExecutor

    exp = _experiment(
        tmp_path / "crash.yaml",
        "ray_crash",
        models=[CRASHY],
        methods=["fp32", "abort_in_convert"],
        bits=["w8a8"],
        runtimes=["torch"],
        data={**SHORT_DATA, "dataset": "synthetic", "pretrain_epochs": 1},
        expect=[],
    )
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    executor = RayExecutor(per_node=2)  # both trials at once, on a core each
    outcome = run_experiment(exp, tracking_uri=uri, output_root=tmp_path, executor=executor)
    by_id = {t.id: t for t in outcome.record.trials}
    assert by_id["crashy-fp32-fp32-torch"].ok
    cores = {by_id[t].details["env"]["cores"] for t in by_id}
    if len(os.sched_getaffinity(0)) >= 2:
        assert len(cores) == 2  # two slots of the node, a core each
    failed = by_id["crashy-abort_in_convert-w8a8-torch"]
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.phase == "convert"
    assert "SIGABRT" in failed.error.reason
    assert outcome.exit_code == 1


class _CtrlCAfterFirst:
    """A Ray executor whose sweep gets Ctrl-C as soon as the first result is in."""

    def __init__(self) -> None:
        from qatbench.sweep.ray_executor import RayExecutor

        self.inner = RayExecutor(per_node=2)  # both trials running at once
        self.stopped_pending = -1

    def run(self, *args: Any) -> TrialResult:
        raise AssertionError("run_many is used")

    def run_many(self, jobs: list[Job]) -> Iterator[tuple[Job, TrialResult]]:
        for item in self.inner.run_many(jobs):
            yield item
            raise KeyboardInterrupt

    def stop(self) -> None:
        if self.stopped_pending < 0:
            self.stopped_pending = len(self.inner._running)
        self.inner.stop()


def test_ctrl_c_cancels_the_trials_still_running_on_ray(
    ray_local: Any, crashy: Any, cache: Path, tmp_path: Path
) -> None:
    exp = _experiment(
        tmp_path / "stop.yaml",
        "ray_ctrl_c",
        models=[CRASHY],
        methods=["fp32", "sleep_in_convert"],
        bits=["w8a8"],
        runtimes=["torch"],
        data={**SHORT_DATA, "dataset": "synthetic", "pretrain_epochs": 1},
        expect=[],
    )
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    executor = _CtrlCAfterFirst()
    start = time.monotonic()
    outcome = run_experiment(exp, tracking_uri=uri, output_root=tmp_path, executor=executor)
    assert time.monotonic() - start < 100  # not the 120 s the sleeping trial wanted
    assert outcome.interrupted == "SIGINT" and outcome.exit_code == 130
    assert [t.id for t in outcome.record.trials] == ["crashy-fp32-fp32-torch"]
    assert outcome.missing == ["crashy-sleep_in_convert-w8a8-torch"]
    assert executor.stopped_pending == 1  # the sleeping trial was cancelled
    assert not executor.inner._running


def test_more_threads_than_any_node_has_cpus_is_a_one_line_error(
    ray_local: Any, tmp_path: Path
) -> None:
    from qatbench.sweep.ray_executor import RayExecutor

    exp = _experiment(tmp_path / "wide.yaml", "ray_wide")
    data = yaml.safe_load(exp.read_text())
    data["measure"]["threads"] = 4
    exp.write_text(yaml.safe_dump(data))
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"measure\.threads 4: no node of the Ray cluster"):
        run_experiment(exp, tracking_uri=uri, output_root=tmp_path, executor=RayExecutor())


def test_an_address_where_no_ray_head_listens_fails_at_once(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    port = free_port()  # nothing listens there
    exp = _experiment(tmp_path / "exp.yaml", "no_head")
    proc = qatbench(
        "run", exp, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"error: --ray-address 127.0.0.1:{port}: no Ray head answers there")
    assert not (tmp_path / "reports").exists()


def test_without_ray_the_executor_option_says_how_to_install_it(tmp_path: Path) -> None:
    hidden = tmp_path / "hide" / "ray"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    exp = _experiment(tmp_path / "exp.yaml", "no_ray")
    proc = qatbench(
        "run", exp, "--executor", "ray", cwd=tmp_path, env={"PYTHONPATH": str(hidden.parent)}
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: --executor ray: Ray is not installed; install the extra: "
        "pip install 'qatbench[ray]'"
    )
    assert not (tmp_path / "reports").exists()
    ray_only = qatbench("run", exp, "--ray-one-per-node", cwd=tmp_path)
    assert ray_only.returncode == 2
    assert ray_only.stderr.strip() == "error: --ray-one-per-node: only with --executor ray"


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the processes ``pids`` listen on."""
    found = []
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids and conn.laddr:
            with contextlib.suppress(psutil.Error):
                found.append((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
    return found


def _tree(pid: int) -> set[int]:
    with contextlib.suppress(psutil.Error):
        return {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
    return set()


def _loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback


def test_the_local_instance_listens_on_loopback_only(ray_local: Any) -> None:
    ports = _listening(_tree(os.getpid()))
    assert {name for _, _, name in ports} >= {"gcs_server", "raylet"}, ports
    assert all(_loopback(ip) for ip, _, _ in ports), ports
    node = ray_local.nodes()[0]
    assert node["NodeManagerAddress"] == "127.0.0.1"


def test_a_head_that_never_answers_exits_2_within_the_connect_timeout(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    exp = _experiment(tmp_path / "exp.yaml", "silent_head")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never speaks gRPC
        port = silent.getsockname()[1]
        start = time.monotonic()
        proc = qatbench(
            "run", exp, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}",
            "--ray-connect-timeout", "5", cwd=tmp_path, timeout=120,
        )  # fmt: skip
        took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert line.startswith(f"error: --ray-address 127.0.0.1:{port}: cannot connect"), line
    assert took < 60  # the 5 s limit plus starting Python and importing Ray
    assert not (tmp_path / "reports").exists()
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_stale_ray_session_file_is_ignored_and_nothing_listens_beyond_loopback(
    tmp_path: Path,
) -> None:
    """Another Ray's session file points at a head that never answers (the 8-minute hang
    of issue 23): the run starts its own instance, on loopback only, and finishes."""
    pytest.importorskip("ray")
    exp = _experiment(
        tmp_path / "one.yaml",
        "stale_session",
        models=["mlp"],
        methods=["fp32"],
        bits=["fp32"],
        runtimes=["torch"],
        expect=[],
    )
    with socket.create_server(("127.0.0.1", 0)) as silent:
        ray_tmp = tmp_path / "raytmp"
        (ray_tmp / "ray").mkdir(parents=True)
        stale = f"127.0.0.1:{silent.getsockname()[1]}"
        (ray_tmp / "ray" / "ray_current_cluster").write_text(stale)
        env = cli_env(tmp_path, {"RAY_TMPDIR": str(ray_tmp)})
        env.pop("RAY_ADDRESS", None)
        command = [str(QATBENCH), "run", str(exp), "--executor", "ray"]
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stderr=subprocess.PIPE)
        seen: list[tuple[str, int, str]] = []
        try:
            deadline = time.monotonic() + 150
            while proc.poll() is None and time.monotonic() < deadline:
                seen.extend(_listening(_tree(proc.pid)))
                time.sleep(0.5)
            assert proc.poll() is not None, "the run hung"
        finally:
            if proc.poll() is None:
                proc.kill()
            stderr = proc.communicate()[1]
    assert proc.returncode == 0, stderr
    names = {name for _, _, name in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # the instance was watched while it ran
    assert all(_loopback(ip) for ip, _, _ in seen), seen
    (report,) = (tmp_path / "reports" / "stale_session").glob("*/report.json")
    (trial,) = json.loads(report.read_text())["trials"]
    assert trial["status"] == "finished" and trial["details"]["env"]["node_id"]
    assert (ray_tmp / "ray" / "ray_current_cluster").read_text() == stale  # left as it was
