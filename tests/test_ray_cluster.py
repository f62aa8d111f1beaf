"""The Ray executor on a two-node cluster (``ray.cluster_utils.Cluster``: two raylets on
this machine, one CPU each), with the Ray worker of a running trial killed.

Every result names the node it ran on, the sweep uses both nodes, the killed trial is run
again and says so (``details.retries``, ``details.lost``), and every trial is in
report.json and MLflow exactly once.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from data.sweep_support import sweep_runs

from qatbench.sweep.runner import run_experiment

TESTS_DIR = Path(__file__).parent
CRASHY = {"name": "crashy", "factory": "data.crashy_methods:build", "options": {"hidden": [32]}}
SLEEPER = "crashy-sleep_once_in_convert-w8a8-torch"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    if str(TESTS_DIR) not in sys.path:
        pytest.skip("tests/ is not on sys.path (pytest run with --import-mode=importlib?)")
    two = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    two.add_node(num_cpus=1)
    two.wait_for_nodes()
    ray.init(address=two.address, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        two.shutdown()


def _experiment(folder: Path, name: str, methods: list[str]) -> Path:
    data = {"dataset": "synthetic", "pretrain_epochs": 1, "eval_samples": 128}
    measure = {"batch_sizes": [1], "max_time_s": 0.2, "min_rounds": 5, "per_layer": False}
    spec = {
        "schema_version": 1,
        "name": name,
        "models": [CRASHY],
        "methods": methods,
        "bits": ["w8a8"],
        "runtimes": ["torch"],
        "data": {**data, "calibration_samples": 64},
        "measure": {**measure, "warmup_s": 0.01, "threads": 1},
        "timeout_s": 150,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _kill_ray_worker_of(marker: Path, killed: list[str]) -> None:
    """Once the sleeping trial wrote its pid, SIGKILL the Ray worker process running it
    (the trial worker's forkserver's parent)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = marker.read_text() if marker.exists() else ""
        if text:
            trial_worker = psutil.Process(int(text))
            ray_worker = trial_worker.parent().parent()
            killed.append(" ".join(ray_worker.cmdline()))
            ray_worker.send_signal(signal.SIGKILL)
            return
        time.sleep(0.2)


@pytest.mark.slow
def test_two_nodes_a_killed_worker_is_retried_and_every_result_names_its_node(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data import crashy_methods

    from qatbench.sweep.ray_executor import RayExecutor

    marker = tmp_path / "sleeping.pid"
    monkeypatch.setenv("QATBENCH_SLEEP_ONCE", str(marker))
    monkeypatch.setenv("QATBENCH_CACHE", str(tmp_path / "cache"))
    crashy_methods.register()
    exp = _experiment(tmp_path, "two_nodes", ["fp32", "sleep_once_in_convert", "ptq"])
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    killed: list[str] = []
    killer = threading.Thread(target=_kill_ray_worker_of, args=(marker, killed), daemon=True)
    killer.start()
    executor = RayExecutor()  # one trial per node at a time
    try:
        outcome = run_experiment(exp, tracking_uri=uri, output_root=tmp_path, executor=executor)
    finally:
        crashy_methods.unregister()
        killer.join(5)
    assert killed and "ray::" in killed[0], killed  # a Ray worker was killed mid-trial

    nodes = {n["NodeID"] for n in cluster.nodes() if n["Alive"]}
    assert len(nodes) == 2
    trials = outcome.record.trials
    assert sorted(t.id for t in trials) == sorted(
        ["crashy-fp32-fp32-torch", SLEEPER, "crashy-ptq-w8a8-torch"]
    )
    assert all(t.ok for t in trials), [(t.id, t.error) for t in trials]
    for trial in trials:
        assert trial.details["env"]["node_id"] in nodes  # every result names its node
        assert trial.details["env"]["cores"]
    by_id = {t.id: t for t in trials}
    sleeper = by_id[SLEEPER]
    assert sleeper.details["retries"] == 1
    (lost,) = sleeper.details["lost"]
    assert lost.startswith("worker killed on "), lost
    others = [t for t in trials if t.id != SLEEPER]
    assert all(t.details["retries"] == 0 and "lost" not in t.details for t in others)
    # both nodes ran trials (the killed attempt counts: it says where it was)
    used = {t.details["env"]["node_id"] for t in trials} | {n for n in nodes if n in lost}
    assert used == nodes

    runs = sweep_runs(uri, "two_nodes", outcome.record.tracking["sweep"])
    assert sorted(r.info.run_name for r in runs) == sorted(t.id for t in trials)  # once each
    assert {r.info.run_id for r in runs} == {t.mlflow_run_id for t in trials}
    assert {r.data.tags["env.node_id"] for r in runs} <= nodes


def test_a_trial_lost_more_often_than_its_retries_fails_naming_the_cause(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data import crashy_methods

    from qatbench.sweep.ray_executor import RayExecutor

    marker = tmp_path / "sleeping.pid"
    monkeypatch.setenv("QATBENCH_SLEEP_ONCE", str(marker))
    monkeypatch.setenv("QATBENCH_CACHE", str(tmp_path / "cache"))
    crashy_methods.register()
    exp = _experiment(tmp_path, "no_retry", ["sleep_once_in_convert"])
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    killed: list[str] = []
    killer = threading.Thread(target=_kill_ray_worker_of, args=(marker, killed), daemon=True)
    killer.start()
    try:
        outcome = run_experiment(
            exp, tracking_uri=uri, output_root=tmp_path, executor=RayExecutor(retries=0)
        )
    finally:
        crashy_methods.unregister()
        killer.join(5)
    (trial,) = outcome.record.trials
    assert trial.status == "failed" and trial.error is not None
    assert trial.error.phase == "worker killed"  # not "start"
    assert trial.error.reason.startswith("worker killed on "), trial.error.reason
    assert trial.details["retries"] == 0 and len(trial.details["lost"]) == 1
    assert trial.details["env"]["node_id"]
    assert outcome.exit_code == 1
