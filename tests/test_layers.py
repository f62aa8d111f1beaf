"""The pipeline's layers (pyproject's ``[tool.importlinter]``) hold, and a breach is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=package_parent,
        timeout=300,
    )


def test_the_layers_hold() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "BROKEN" not in done.stdout


def test_a_method_importing_the_sweep_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(
        ROOT / "qatbench", tmp_path / "qatbench", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "qatbench" / "methods" / "sneaky.py").write_text(
        "from qatbench.sweep import runner  # a method reaching up into the runner\n"
    )
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "qatbench.methods.sneaky -> qatbench.sweep.runner" in done.stdout
