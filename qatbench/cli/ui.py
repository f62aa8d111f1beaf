"""``qatbench ui``: the MLflow UI over qatbench's store, as one process group that stops cleanly.

The server (``mlflow server`` and the uvicorn process it starts) runs in a session of its
own, so a Ctrl-C reaches only qatbench, which then stops the whole group: SIGTERM, a grace
period, then SIGKILL for whatever is left. Settings suit a small machine: one worker, no
background job runner, no telemetry, bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from qatbench.errors import ConfigError, QatbenchError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
START_TIMEOUT_S = 180.0  # a first start migrates a new SQLite store, slow on a small machine
STOP_GRACE_S = 10.0
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey job runner beside the server
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


class ServerError(QatbenchError):
    """The MLflow server could not start or stopped on its own."""

    exit_code = 1


def server_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command line for the store at ``uri``."""
    from qatbench.tracking.store import artifact_root_for

    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    root = artifact_root_for(uri)
    if root is not None:
        # Artifacts are plain files beside the database: new experiments put theirs there
        # too, and the server reads them directly instead of proxying uploads.
        command += ["--default-artifact-root", root, "--no-serve-artifacts"]
    return [*command, "--host", host, "--port", str(port), "--workers", "1"]


def check_port_free(host: str, port: int) -> None:
    """Raise a one-line ConfigError when ``host:port`` cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "choose another port"
            ) from None


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def url_for(host: str, port: int) -> str:
    """The address to open: a wildcard bind is reached through the loopback interface."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


@dataclass
class UiServer:
    """A running ``mlflow server`` process group."""

    process: subprocess.Popen[bytes]
    url: str

    @property
    def pgid(self) -> int:
        return self.process.pid  # start_new_session: the leader's pid is the group id

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Return once ``/health`` answers; ServerError if the server exits or never does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"mlflow server exited with code {code} before it answered")
            if self.healthy():
                return
            time.sleep(0.25)
        raise ServerError(f"mlflow server did not answer {self.url}/health in {timeout_s:g} s")

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a process of the group changed its user: still there
            return True
        return True

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every process of the group: SIGTERM, then SIGKILL after ``grace_s``."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace_s)
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.group_alive():
            self._signal_group(signal.SIGKILL)
            self.process.wait()
            deadline = time.monotonic() + grace_s
            while self.group_alive() and time.monotonic() < deadline:
                time.sleep(0.1)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signum)


def start(uri: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> UiServer:
    """Create the store if needed and start ``mlflow server`` over it (not waiting)."""
    from qatbench.tracking.store import init_store

    if uri and uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"--tracking-uri {uri}: this store is a tracking server already; open it in a "
            "browser instead"
        )
    if port == 0:
        port = free_port(host or DEFAULT_HOST)
    check_port_free(host, port)
    uri = init_store(uri)
    env = {**os.environ, **SERVER_ENV}
    process = subprocess.Popen(
        server_command(uri, host, port), env=env, start_new_session=True, stdin=subprocess.DEVNULL
    )
    return UiServer(process, url_for(host, port))


class _Terminated(Exception):
    """SIGTERM arrived while serving."""


@contextlib.contextmanager
def _handled(signum: int, handler: Any) -> Iterator[None]:
    """Install ``handler`` for ``signum`` while in the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise _Terminated


def serve(
    uri: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    echo: Callable[[str], None] = print,
) -> int:
    """Serve the UI until Ctrl-C (exit code 130) or SIGTERM (143); the server stopping on
    its own is a ServerError. The whole process group is gone when this returns."""
    server: UiServer | None = None
    try:
        # Ctrl-C works even where SIGINT was inherited as ignored (a background job).
        with (
            _handled(signal.SIGTERM, _raise_terminated),
            _handled(signal.SIGINT, signal.default_int_handler),
        ):
            server = start(uri, host, port)
            server.wait_healthy()
            echo(f"MLflow UI: {server.url}  (Ctrl-C stops it)")
            code = server.process.wait()
            raise ServerError(f"mlflow server stopped on its own with code {code}")
    except KeyboardInterrupt:
        echo("stopping the MLflow UI")
        return 130
    except _Terminated:
        return 143
    finally:
        if server is not None:
            with _handled(signal.SIGINT, signal.SIG_IGN):  # a second Ctrl-C must not
                server.stop()  # leave half the group behind
