"""New SQLite MLflow stores in tests start from one migrated template instead of migrating.

MLflow builds a new SQLite store by running its 60-odd alembic migrations, which takes
about 5 s a store on a busy 2-core machine, and the suite creates a fresh store (a
``tmp_path``) in well over a hundred tests. What the tests check is qatbench's use of the
store, not MLflow's migrations, so here the migrations run once per test session, into a
template database, and every later new store gets the template's pages through SQLite's
online backup API: the same tables, indexes and ``alembic_version`` row the migrations
write. The template holds no experiment; MLflow then creates the Default experiment
itself, with the artifact location of the store being opened, as for a migrated store.

MLflow's own log lines of a first use are still emitted, so tests of what a
run prints (third-party lines go to the log file, not the terminal) see the same records.

``activate()`` patches ``mlflow.store.db.utils._initialize_tables`` in this process (now,
or when MLflow is first imported). The session's conftest sets ``ENV`` to a folder of its
own and puts ``sitecustomize.py`` beside this file on ``PYTHONPATH``, so that ``qatbench``
subprocesses do the same; without ``ENV`` nothing is patched.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.abc
import importlib.util
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "QATBENCH_TEST_MLFLOW_TEMPLATE_DIR"
HERE = Path(__file__).resolve().parent
_MODULE = "mlflow.store.db.utils"


def activate() -> None:
    """Patch MLflow's table creation in this process when ``ENV`` names a folder."""
    if not os.environ.get(ENV):
        return
    module = sys.modules.get(_MODULE)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches ``mlflow.store.db.utils`` right after it is first imported (and imports
    nothing of MLflow before, so a subprocess that never tracks pays nothing)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def _patch(module: Any) -> None:
    original = module._initialize_tables
    if getattr(original, "_from_template", False):
        return

    def initialize_tables(engine: Any) -> None:
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        if not database or database == ":memory:" or database.startswith("file:"):
            original(engine)
            return
        template = _template(original)
        module._logger.info("Creating initial MLflow database tables...")
        module._logger.info("Updating database tables")
        engine.dispose()
        source = sqlite3.connect(f"file:{template}?mode=ro", uri=True)
        target = sqlite3.connect(database)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()

    initialize_tables._from_template = True  # type: ignore[attr-defined]
    module._initialize_tables = initialize_tables


def _template(initialize: Any) -> Path:
    """The session's migrated, empty database, built by the first process that needs it."""
    folder = Path(os.environ[ENV])
    template = folder / "mlflow.db"
    if template.is_file():
        return template
    with _locked(folder / "template.lock"):
        if not template.is_file():
            import sqlalchemy

            building = folder / f"building-{os.getpid()}.db"
            engine = sqlalchemy.create_engine(f"sqlite:///{building}")
            try:
                initialize(engine)
            finally:
                engine.dispose()
            os.replace(building, template)
    return template


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
