"""Quiet output: ``qatbench run`` shows its own progress and results, the libraries
underneath write to a log file in the sweep folder (``qatbench.log``); ``-v`` shows all.

What goes to the log: the records of Python loggers other than qatbench's (MLflow's store
migrations, alembic), warnings raised outside qatbench (torch deprecations, torchao), and
everything the worker processes print (the forkserver they fork from, and the resource
tracker beside it, are started with their stdout and stderr on the log: CUDA libraries that
fail to load, Hugging Face weight-loading bars, ``resource_tracker`` leak notes at exit).
MLflow's ``View run`` lines on a tracking server are not printed (report.html links each
run). qatbench's own warnings (a broken plugin, an unlogged trial) still show.

The sweep folder exists only once the sweep starts, so the log starts as a hidden file in
``--output-dir`` and is renamed into the sweep folder when the sweep returns; processes
that hold it open keep writing to it there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import qatbench
from qatbench.results import current_umask

LOG_NAME = "qatbench.log"  # in the sweep folder, beside report.json
_PACKAGE_DIR = str(Path(qatbench.__file__).parent)
# Loggers MLflow gives a handler of their own (stderr) and keeps from propagating.
_OWN_HANDLER_LOGGERS = ("mlflow", "sqlalchemy.engine", "alembic", "huey")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ThirdPartyLog:
    """The log file third-party output goes to while ``qatbench run`` runs."""

    def __init__(self, folder: Path) -> None:
        folder = folder.absolute()
        self._created = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        self._folder = folder
        fd, name = tempfile.mkstemp(prefix=".qatbench-", suffix=".log", dir=folder)
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        self.path = Path(name)
        self._handler = logging.FileHandler(self.path, delay=False)
        self._handler.setFormatter(logging.Formatter(_FORMAT))

    @property
    def moved(self) -> bool:
        """Whether the log is in a sweep folder already."""
        return self.path.parent != self._folder

    def write(self, text: str) -> None:
        """Append a line that is not a logging record (a warning) to the log."""
        stream = self._handler.stream
        if stream is None:  # closed
            return
        stream.write(text if text.endswith("\n") else text + "\n")
        stream.flush()

    def move_to(self, folder: Path) -> Path:
        """Move the log into ``folder`` (a sweep's): ``qatbench.log``, or for a resumed sweep
        that has one, ``qatbench.2.log`` and so on. Open descriptors follow the file."""
        target, attempt = folder / LOG_NAME, 1
        while target.exists():
            attempt += 1
            target = folder / f"qatbench.{attempt}.log"
        self.path.rename(target)
        self.path = target
        self._handler.close()
        self._handler.baseFilename = str(target)
        self._handler.stream = self._handler._open()
        return target

    def close(self) -> None:
        """Close the log; one that never reached a sweep folder (the run stopped before a
        sweep began: an unreachable store, say) is removed with the folders made for it."""
        self._handler.close()
        if self.moved:  # in a sweep folder: kept
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
            for folder in self._created:  # deepest first; stops at one that is not empty
                folder.rmdir()


def is_own_warning(filename: str) -> bool:
    """Whether a warning was raised from qatbench's own code (it is then shown)."""
    return os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep)


_ACTIVE: ThirdPartyLog | None = None


def active_log() -> ThirdPartyLog | None:
    """The log third-party warnings go to now, if ``qatbench run`` is quiet."""
    return _ACTIVE


@contextlib.contextmanager
def third_party_to(log: ThirdPartyLog) -> Iterator[ThirdPartyLog]:
    """Route third-party logging, warnings and worker output to ``log`` in the block."""
    global _ACTIVE
    import mlflow  # noqa: F401  configures its loggers on import: replaced below

    from qatbench.sweep.executor import start_worker_server

    saved = {name: logging.getLogger(name).handlers for name in _OWN_HANDLER_LOGGERS}
    root = logging.getLogger()
    for name in _OWN_HANDLER_LOGGERS:
        logging.getLogger(name).handlers = [log._handler]
    root.addHandler(log._handler)
    env = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    previous_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _ACTIVE = log
    try:
        start_worker_server(log.path)
        yield log
    finally:
        _ACTIVE = None
        root.removeHandler(log._handler)
        for name, handlers in saved.items():
            logging.getLogger(name).handlers = handlers
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Loggers with a stderr handler of their own (torch's structured "W1205 ..." lines); the
# others reach stderr only through logging's last resort, which a root handler replaces.
_LOUD_LOGGERS = ("torch",)


@contextlib.contextmanager
def libraries_quiet() -> Iterator[None]:
    """Drop third-party log records below ERROR in the block: ``validate`` and ``list``
    import every plugin named (torchao announces the CUDA libraries it cannot load, torch
    its deprecations) and print nothing but their own lines. torch resets its loggers'
    levels when it is imported, which may happen inside the block: their ``setLevel`` is
    held still until the block ends (importing torch first would cost every validate of a
    file that fails before needing it a second or two)."""
    root = logging.getLogger()
    null = logging.NullHandler()
    root.addHandler(null)
    loud = {logging.getLogger(name): logging.getLogger(name).level for name in _LOUD_LOGGERS}
    for logger in loud:
        logger.setLevel(logging.ERROR)
        logger.setLevel = _held  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        root.removeHandler(null)
        for logger, level in loud.items():
            del logger.setLevel  # the class's method again
            logger.setLevel(level)


def _held(_level: int | str) -> None:
    """``Logger.setLevel`` while :func:`libraries_quiet` holds a logger's level."""
