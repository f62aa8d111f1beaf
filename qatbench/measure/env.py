"""Fingerprint of the machine and software a measurement ran on, as JSON-able data.

Stored with every result so two reports can tell whether they are comparable. Library
versions come from installed package metadata: nothing heavy (torch, mlflow) is imported.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

RELEVANT_CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_int8",
    "amx_bf16",
    "amx_tile",
)
VERSIONED_PACKAGES = ("torch", "onnx", "onnxruntime", "numpy", "mlflow", "qatbench")
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
NOT_INSTALLED = "not installed"
_CPUINFO = Path("/proc/cpuinfo")
_GIT_TIMEOUT_S = 5.0


def _cpuinfo_first_processor() -> dict[str, str]:
    """``key: value`` lines of the first processor in /proc/cpuinfo; empty where absent."""
    try:
        text = _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _git(cwd: Path, *args: str) -> str | None:
    """stdout of ``git args`` in ``cwd``, or None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(cwd: Path) -> tuple[str | None, bool | None]:
    """Commit of the repository holding ``cwd`` and whether tracked files differ from it.

    Both are None outside a repository (or in one without commits).
    """
    commit = _git(cwd, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else status != ""


def fingerprint(threads: int | None = None) -> dict[str, Any]:
    """Describe this machine, its software and the thread settings of a measurement.

    ``threads`` is the intra-op thread count the caller fixed (None when left to the
    libraries). The git fields describe the repository of the current working directory.
    """
    cpuinfo = _cpuinfo_first_processor()
    flags = set(cpuinfo.get("flags", "").split())
    commit, dirty = git_state(Path.cwd())
    return {
        "cpu_model": cpuinfo.get("model name") or platform.processor() or "unknown",
        "cpu_flags_relevant": [flag for flag in RELEVANT_CPU_FLAGS if flag in flags],
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _package_version(name) for name in VERSIONED_PACKAGES},
        "hostname": socket.gethostname(),
        "git_commit": commit,
        "git_dirty": dirty,
        "threads": threads,
        "thread_env": {var: os.environ[var] for var in THREAD_ENV_VARS if var in os.environ},
    }
