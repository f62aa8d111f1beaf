"""Get a Ray instance for a sweep: start a private one on loopback, or connect to a named
cluster within a time limit; never hang, never expose the machine.

Without an address, :func:`start_local` starts a fresh instance (``address="local"``), so a
session file another Ray left behind (``/tmp/ray/ray_current_cluster``) is never followed,
in a temporary folder of its own, with every Ray server bound to 127.0.0.1: Ray rewrites a
loopback node address to the machine's interface address (and then listens on every
interface) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off, which this module sets for
the instance's lifetime. :func:`connect` runs ``ray.init`` in a helper thread and gives up
after ``timeout_s``, with one line naming the address and what Ray answered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatbench.errors import ConfigError

LOOPBACK = "127.0.0.1"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": node address stays 127.0.0.1
CONNECT_TIMEOUT_S = 30.0
_CONNECT_THREAD = "qatbench-ray-connect"


@dataclass
class Instance:
    """The Ray a sweep runs on: ``started`` when this process started it (and must stop it)."""

    ray: Any
    address: str
    started: bool
    temp_dir: Path | None = None
    _env_before: dict[str, str | None] = field(default_factory=dict)
    _cluster_mode_before: bool | None = None

    def close(self) -> None:
        """Shut down an instance this process started and remove its folder; a cluster it
        only connected to is left running (the driver disconnects)."""
        if self.ray.is_initialized():
            self.ray.shutdown()
        for name, value in self._env_before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._env_before = {}
        if self._cluster_mode_before is not None:
            _set_cluster_mode(self._cluster_mode_before)
            self._cluster_mode_before = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def attached(ray: Any) -> Instance:
    """The Ray this process already initialised (a test, a notebook), used as it is."""
    context = ray.get_runtime_context()
    return Instance(ray, str(getattr(context, "gcs_address", "") or "existing"), started=False)


def start_local(ray: Any, *, num_cpus: int | None = None) -> Instance:
    """A fresh Ray instance on this machine, every server on 127.0.0.1; see the module doc."""
    before = {LOCAL_ONLY_ENV: os.environ.get(LOCAL_ONLY_ENV)}
    os.environ[LOCAL_ONLY_ENV] = "0"  # the raylet and its workers inherit it
    mode = _set_cluster_mode(False)  # this process imported ray (and read the variable)
    # Short and private: Ray's Unix sockets live under it (paths of at most 107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="qbray-", dir=_short_tmp()))
    instance = Instance(ray, LOOPBACK, True, temp_dir, before, mode)
    try:
        ray.init(
            address="local",  # never the cluster a session file points at
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
            _node_ip_address=LOOPBACK,
            _temp_dir=str(temp_dir),
        )
    except Exception as exc:  # Ray raises many kinds; each is this one failure
        instance.close()
        raise ConfigError(
            f"--executor ray: cannot start a local Ray instance: {one_line(exc)}"
        ) from None
    instance.address = str(ray.get_runtime_context().gcs_address)
    return instance


def connect(ray: Any, address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Instance:
    """Connect to the Ray cluster at ``address`` within ``timeout_s``, or fail in one line.

    A ``host:port`` where nothing listens fails at once; a head that answers but whose
    nodes cannot be reached (they advertise another interface's address) makes
    ``ray.init`` wait, and that wait is cut off at ``timeout_s``. The first try is made
    in a child process (:func:`_probe`), which can be killed: a ``ray.init`` abandoned
    half-way in this process can crash it at exit.
    """
    _check_reachable(address, timeout_s)
    _probe(address, timeout_s)
    answer: dict[str, BaseException | None] = {}
    messages = _Collect()

    def init() -> None:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                logging_level="WARNING",
                log_to_driver=False,
            )
            answer["error"] = None
        except BaseException as exc:  # reported by the caller's thread
            answer["error"] = exc

    # What Ray logs while connecting is what it "answered": kept for the error line, not
    # printed (the user sees one line, not Ray's retry warnings).
    ray_logger = logging.getLogger("ray")
    quiet = [h for h in ray_logger.handlers if h is not messages]
    for handler in quiet:
        handler.addFilter(_not_connecting)
    ray_logger.addHandler(messages)
    try:
        with _captured_stderr() as native:  # Ray's C++ core writes its warnings to fd 2
            thread = threading.Thread(target=init, name=_CONNECT_THREAD, daemon=True)
            thread.start()
            thread.join(timeout_s)
    finally:
        ray_logger.removeHandler(messages)
        for handler in quiet:
            handler.removeFilter(_not_connecting)
    if thread.is_alive():
        said = messages.last or _last_native_line(native) or "no answer"
        raise ConfigError(
            f"--ray-address {address}: cannot connect within {timeout_s:g} s "
            f"(--ray-connect-timeout); Ray said: {said}"
        )
    error = answer.get("error")
    if error is not None:
        raise ConfigError(f"--ray-address {address}: cannot connect: {one_line(error)}")
    return Instance(ray, address, started=False)


_PROBE = (
    "import sys, ray; ray.init(address=sys.argv[1], include_dashboard=False, "
    "log_to_driver=False, logging_level='WARNING'); ray.shutdown()"
)


def _probe(address: str, timeout_s: float) -> None:
    """Connect to ``address`` from a child process (its own process group, killed as a
    whole at ``timeout_s``); a one-line ConfigError with Ray's last words if it cannot."""
    child = subprocess.Popen(
        [sys.executable, "-c", _PROBE, address],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        _, stderr = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        _, stderr = child.communicate()
        raise ConfigError(
            f"--ray-address {address}: cannot connect within {timeout_s:g} s "
            f"(--ray-connect-timeout); Ray said: {_last_line(stderr) or 'no answer'}"
        ) from None
    if child.returncode != 0:
        said = _last_line(stderr) or f"exit status {child.returncode}"
        raise ConfigError(f"--ray-address {address}: cannot connect: {said}")


def _last_line(text: str) -> str:
    """The last line Ray wrote, without its ``[time level pid tid] file:line:`` prefix or
    its logging prefix."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    line = re.sub(r"^\[[^\]]*\]\s*(?:[\w.]+:\d+:\s*)?", "", lines[-1])
    return re.sub(r"^\S+ \S+\s+(?:WARNING|ERROR|INFO)\s+\S+:\d+ -- ", "", line)


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Path]:
    """File descriptor 2 written to a temporary file while in the block (whose path is
    yielded, for reading after it), so Ray's native warnings do not reach the terminal."""
    with tempfile.TemporaryDirectory(prefix="qatbench-ray-connect-") as folder:
        path = Path(folder) / "stderr"
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        saved = os.dup(2)
        try:
            with path.open("wb") as sink:
                os.dup2(sink.fileno(), 2)
                try:
                    yield path
                finally:
                    os.dup2(saved, 2)
        finally:
            os.close(saved)


def _last_native_line(path: Path) -> str:
    """The last line Ray's core wrote to the captured file descriptor 2."""
    try:
        return _last_line(path.read_text(errors="replace"))
    except OSError:
        return ""


def _not_connecting(record: logging.LogRecord) -> bool:
    return record.threadName != _CONNECT_THREAD


class _Collect(logging.Handler):
    """Keeps the last warning Ray logged while connecting (but the one that it runs in a
    helper thread, which says nothing about the cluster)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            message = one_line(record.getMessage())
            if record.threadName == _CONNECT_THREAD and "main thread" not in message:
                self.last = message


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail in seconds on a ``host:port`` where no Ray head listens; other forms
    (``auto``, ``ray://``) are left to Ray and the time limit."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout_s, 5.0)).close()
    except OSError as exc:
        raise ConfigError(
            f"--ray-address {address}: no Ray head answers there ({one_line(exc)}); "
            "start one with: ray start --head"
        ) from None


def _set_cluster_mode(enabled: bool) -> bool | None:
    """Set Ray's cluster mode in this process; the previous setting (None where this Ray
    has no such setting, and only the environment variable, read at import, counts)."""
    try:  # read by services.get_node_ip_address at each call
        from ray._private import ray_constants
    except ImportError:
        return None
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        return None
    before = bool(ray_constants.ENABLE_RAY_CLUSTER)
    ray_constants.ENABLE_RAY_CLUSTER = enabled
    return before


def _short_tmp() -> str:
    return "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else tempfile.gettempdir()


def one_line(error: object) -> str:
    """The first non-blank line of ``error``'s text, or its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
