"""A real ``mlflow server`` on 127.0.0.1 for the scale-out tests (shared tracking).

The SQLite store is created once, before the server starts (two processes creating its
tables at once fail); the server runs one worker, with job execution and telemetry off, in
a process group of its own that is killed as a whole at teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MLFLOW = Path(sys.executable).with_name("mlflow")
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """Start a server over an SQLite store in ``folder``; yield its http URI; stop it."""
    from qatbench.tracking.store import init_store

    folder.mkdir(parents=True, exist_ok=True)
    backend = init_store(f"sqlite:///{(folder / 'mlflow.db').resolve()}")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    log = (folder / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            (folder / "artifacts").resolve().as_uri(),
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group: uvicorn's children die with it
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, proc, folder / "server.log")
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()


def _wait_healthy(uri: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise AssertionError(
        f"mlflow server not healthy after {START_TIMEOUT_S:g} s:\n{log.read_text()}"
    )
