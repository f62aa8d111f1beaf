"""Shared tracking: several writers log to one real ``mlflow server`` at once.

The server (tests/data/mlflow_server.py) listens on 127.0.0.1 over an SQLite store in a
temporary folder. Writers racing to create the same experiment get one experiment; two
shards of a sweep run at the same time log each trial exactly once, each run naming the
machine that measured it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from data.mlflow_server import mlflow_server
from data.sweep_support import QATBENCH, all_runs, cli_env, write_experiment
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from qatbench.results import RunRecord
from qatbench.spec.schema import load_experiment

RACERS = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


def test_writers_racing_to_create_the_experiment_get_the_same_one(
    server: str, tmp_path: Path
) -> None:
    start = time.time() + 8  # every process imported mlflow by then: they create at once
    script = (
        "import sys, time\n"
        "from qatbench.tracking.tracker import Tracker\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "print(Tracker(sys.argv[1], 'raced').experiment_id)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, server, str(start)],
            env=cli_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(RACERS)
    ]
    answers = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * RACERS, [err for _, err in answers]
    ids = {out.strip() for out, _ in answers}
    assert len(ids) == 1
    client = MlflowClient(tracking_uri=server)
    found = client.search_experiments(filter_string="name = 'raced'")
    assert [e.experiment_id for e in found] == list(ids)
    # what a loser of the race gets from the server, and Tracker takes as "use theirs"
    with pytest.raises(MlflowException) as lost:
        client.create_experiment("raced")
    assert lost.value.error_code == "RESOURCE_ALREADY_EXISTS"


@pytest.mark.slow
def test_two_shards_at_once_log_each_trial_once_and_merge(server: str, tmp_path: Path) -> None:
    exp = write_experiment(
        tmp_path / "exp.yaml", "shared", server, bits="[w8a8]", runtimes="[torch, onnxruntime]"
    )
    grid = [t.id for t in load_experiment(exp).expand()]
    procs = [
        subprocess.Popen(
            [str(QATBENCH), "run", str(exp), "--shard", f"{i}/2"],
            cwd=tmp_path,
            env=cli_env(tmp_path / f"shard{i}"),  # separate machines: separate caches
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out + err
        assert "View run" not in out + err  # MLflow's run links: report.html has them
    reports = sorted((tmp_path / "reports" / "shared").glob("*/report.json"))
    assert len(reports) == 2

    merged = subprocess.run(
        [str(QATBENCH), "merge", *map(str, reports), "--output", "merged"],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert merged.returncode == 0, merged.stderr
    record = RunRecord.load(tmp_path / "merged" / "report.json")
    assert sorted(t.id for t in record.trials) == sorted(grid)
    assert all(t.ok for t in record.trials)
    assert len(record.tracking["shards"]) == 2  # two sweeps, one store
    assert record.tracking["uri"] == server

    runs = all_runs(server, "shared")
    assert sorted(r.info.run_name for r in runs) == sorted(grid)  # each trial exactly once
    assert {r.info.run_id for r in runs} == {t.mlflow_run_id for t in record.trials}
    assert {r.info.status for r in runs} == {"FINISHED"}
    host = socket.gethostname()
    assert {r.data.tags["env.hostname"] for r in runs} == {host}
    # every result names the machine that ran it, in report.json and in MLflow's trial.json
    assert {t.details["env"]["hostname"] for t in record.trials} == {host}
    client = MlflowClient(tracking_uri=server)
    logged = client.download_artifacts(runs[0].info.run_id, "trial.json", str(tmp_path))
    assert json.loads(Path(logged).read_text())["details"]["env"]["hostname"] == host
    graphs = [t for t in record.trials if t.runtime == "onnxruntime"]  # torch trials: none
    assert graphs and all(Path(t.artifacts["onnx"]).is_file() for t in graphs)  # the shards' own
