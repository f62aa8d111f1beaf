"""The MLflow store: its default URI, creating it once, and reaching it fast or failing.

The embedded default store is an SQLite database (``mlruns/mlflow.db``) next to an artifact
folder (``mlruns/artifacts``); any other tracking URI is used as given.
"""

from __future__ import annotations

import fcntl
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient

from qatbench.errors import TrackingError

DEFAULT_DIR = "mlruns"
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "artifacts"
REACHABILITY_TIMEOUT_S = 5.0
_SQLITE_PREFIX = "sqlite:///"


def default_uri(root: Path | None = None) -> str:
    """The embedded store under ``<root>/mlruns`` (``root`` defaults to the working directory)."""
    db = (Path(root) if root is not None else Path.cwd()).resolve() / DEFAULT_DIR / DB_NAME
    return _SQLITE_PREFIX + db.as_posix()


def artifact_root_for(uri: str) -> str | None:
    """The artifact root that goes with an SQLite store (a folder beside the database).

    Returns None for any other store: a tracking server decides where artifacts go.
    """
    db = sqlite_file(uri)
    return None if db is None else (db.resolve().parent / ARTIFACT_DIR).as_uri()


def init_store(uri: str | None = None, root: Path | None = None) -> str:
    """Create the SQLite store behind ``uri`` once and return the URI; idempotent.

    MLflow creates its tables on first use, which takes seconds and fails when two processes
    do it at once, so creation is serialised by a lock file beside the database. Other
    stores (a server, another database) manage their own schema and are returned as given.
    """
    uri = uri or default_uri(root)
    db = sqlite_file(uri)
    if db is None:
        return uri
    db.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(db.with_name(db.name + ".lock")):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


def store_client(uri: str) -> MlflowClient:
    """A client on an existing store: never creates an empty SQLite database."""
    check_reachable(uri)
    db = sqlite_file(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"tracking uri {uri}: no such store ({db} does not exist)")
    return MlflowClient(tracking_uri=uri)


def sqlite_file(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI; None for in-memory and non-SQLite URIs."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    path = uri[len(_SQLITE_PREFIX) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def check_reachable(uri: str) -> None:
    """Fail fast on an http(s) server that does not answer, instead of MLflow's long retries.

    Any HTTP answer, even an error status, proves the server is there.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=REACHABILITY_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return
    except urllib.error.URLError as exc:
        reason = exc.reason
    except OSError as exc:  # a timeout or reset while reading the answer
        reason = exc
    raise TrackingError(f"tracking uri {uri} is not reachable: {one_line(reason)}")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) while in the block."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence MLflow's per-download progress bar on stderr while in the block."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def one_line(error: object) -> str:
    """The first non-empty line of an error's text (MLflow messages can span many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
