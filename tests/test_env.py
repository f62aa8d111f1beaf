"""The environment fingerprint: its keys, JSON form, git state and package metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qatbench.measure import env

KEYS = {
    "cpu_model",
    "cpu_flags_relevant",
    "cpu_count_logical",
    "cpu_count_physical",
    "os",
    "python",
    "versions",
    "hostname",
    "git_commit",
    "git_dirty",
    "threads",
    "thread_env",
}


def test_fingerprint_has_every_key_and_is_json_serialisable() -> None:
    data = env.fingerprint(threads=2)
    assert set(data) == KEYS
    assert json.loads(json.dumps(data)) == data
    assert data["threads"] == 2
    assert isinstance(data["cpu_model"], str) and data["cpu_model"]
    assert set(data["cpu_flags_relevant"]) <= set(env.RELEVANT_CPU_FLAGS)
    assert data["cpu_count_logical"] >= 1
    assert set(data["versions"]) == set(env.VERSIONED_PACKAGES)
    assert data["versions"]["numpy"] == np.__version__


def test_missing_packages_are_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env, "VERSIONED_PACKAGES", ("qatbench-surely-not-a-package",))
    versions = env.fingerprint()["versions"]
    assert versions == {"qatbench-surely-not-a-package": env.NOT_INSTALLED}


def test_thread_env_vars_are_recorded_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert env.fingerprint()["thread_env"] == {"OMP_NUM_THREADS": "3"}


def test_git_state_outside_a_repository_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = env.fingerprint()
    assert (data["git_commit"], data["git_dirty"]) == (None, None)


def test_git_state_of_a_repository(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    tracked = tmp_path / "a.txt"
    tracked.write_text("one\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    commit, dirty = env.git_state(tmp_path)
    assert commit is not None and len(commit) == 40
    assert dirty is False
    tracked.write_text("two\n")
    assert env.git_state(tmp_path) == (commit, True)


def test_fingerprint_imports_neither_torch_nor_mlflow() -> None:
    code = (
        "import sys; from qatbench.measure.env import fingerprint; fingerprint(); "
        "print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
