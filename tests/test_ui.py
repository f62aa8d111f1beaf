"""``qatbench ui``: the MLflow server over a store, its REST API and page, a clean stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from qatbench.cli import ui
from qatbench.errors import ConfigError

QATBENCH = str(Path(sys.executable).with_name("qatbench"))  # the console script
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]


def test_the_server_command_suits_a_small_machine(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    command = ui.server_command(uri, "127.0.0.1", 5123)
    assert command[:4] == [sys.executable, "-m", "mlflow", "server"]
    joined = " ".join(command)
    assert f"--backend-store-uri {uri}" in joined
    assert f"--default-artifact-root {(tmp_path / 'mlruns' / 'artifacts').as_uri()}" in joined
    assert "--host 127.0.0.1 --port 5123 --workers 1" in joined
    assert ui.SERVER_ENV == {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def test_urls_reach_wildcard_binds_through_loopback() -> None:
    assert ui.url_for("127.0.0.1", 5000) == "http://127.0.0.1:5000"
    assert ui.url_for("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert ui.url_for("::", 8080) == "http://[::1]:8080"


def test_a_busy_port_is_one_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^--port {port}: cannot listen on 127\.0\.0\.1"):
            ui.start(None, "127.0.0.1", port)


def test_a_tracking_server_needs_no_ui() -> None:
    with pytest.raises(ConfigError, match="is a tracking server already"):
        ui.start("http://127.0.0.1:5999", "127.0.0.1", 0)


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.loads(response.read()))


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return dict(json.loads(response.read()))


def _wait_healthy(url: str, process: subprocess.Popen[str], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"qatbench ui exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url}/health did not answer in {timeout_s} s")


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, str, str]:
    """A temporary SQLite store holding one finished trial: (uri, experiment id, run id)."""
    from qatbench.results import TrialResult
    from qatbench.tracking.store import default_uri
    from qatbench.tracking.tracker import Tracker

    uri = default_uri(tmp_path)
    tracker = Tracker(uri, "ui_check")
    result = TrialResult(
        id="mlp-ptq-w8a8-torch",
        model="mlp",
        method="ptq",
        bits="w8a8",
        runtime="torch",
        status="finished",
        metrics={"mse": 0.001, "compression_ratio": 3.7},
    )
    run_id = tracker.log_trial(result, params={"threads": 1})
    return uri, tracker.experiment_id, run_id


@pytest.fixture
def served(store: tuple[str, str, str], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``qatbench ui`` running over ``store`` on a free port, as a user starts it."""
    uri = store[0]
    port = ui.free_port()
    process = subprocess.Popen(
        [QATBENCH, "ui", "--tracking-uri", uri, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
    )
    info: dict[str, Any] = {"process": process, "url": f"http://127.0.0.1:{port}"}
    try:
        yield info
    finally:
        if process.poll() is None:  # the test failed before stopping it
            process.kill()
            process.wait()
            for pid in info.get("group", []):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow
def test_ui_serves_the_runs_and_stops_its_whole_process_group(
    served: dict[str, Any], store: tuple[str, str, str]
) -> None:
    _uri, experiment_id, run_id = store
    process, url = served["process"], served["url"]
    _wait_healthy(url, process)
    children = psutil.Process(process.pid).children(recursive=True)
    served["group"] = sorted({os.getpgid(c.pid) for c in children})
    assert len(served["group"]) == 1 and served["group"][0] != os.getpgid(process.pid)

    # The REST API lists the experiment and its run (POST, as MLflow 3's reference says).
    found = _post(f"{url}/api/2.0/mlflow/experiments/search", {"max_results": 100})
    names = {e["name"]: e["experiment_id"] for e in found["experiments"]}
    assert names["ui_check"] == experiment_id
    runs = _post(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
    (run,) = runs["runs"]
    assert run["info"]["run_id"] == run_id and run["info"]["run_name"] == "mlp-ptq-w8a8-torch"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["compression_ratio"] == 3.7
    artifacts = _get(f"{url}/api/2.0/mlflow/artifacts/list?run_id={run_id}")
    assert "trial.json" in {f["path"] for f in artifacts.get("files", [])}

    _render_in_chromium(url, experiment_id)

    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 130, out
    assert f"MLflow UI: {url}" in out
    assert "Traceback" not in out
    with pytest.raises(ProcessLookupError):
        os.killpg(served["group"][0], 0)
    assert not [
        c.pid
        for c in children
        if psutil.pid_exists(c.pid) and psutil.Process(c.pid).status() != psutil.STATUS_ZOMBIE
    ]


def _render_in_chromium(url: str, experiment_id: str) -> None:
    """The experiment's page in headless Chromium shows its run, without page errors."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing")
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url, timeout=120_000)
            page.get_by_text("ui_check").first.wait_for(timeout=120_000)  # experiments list
            # MLflow 3 opens an experiment on its GenAI overview; the runs table is the
            # "Model training" view.
            runs = f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            page.goto(runs, timeout=120_000)
            page.get_by_text("mlp-ptq-w8a8-torch").first.wait_for(timeout=120_000)
            assert "MLflow" in page.title()
        finally:
            browser.close()
    assert errors == []
