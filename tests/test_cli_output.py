"""Smaller things a user of the command line sees (issue 24): ``--version``, help texts
that say the truth without ``<bool>``, ``list methods`` at 80 columns, reports written
with the user's umask, and ``--baseline previous`` passing over partial sweeps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import pytest

from qatbench.report.sources import Sweep
from qatbench.results import RunRecord, write_text_atomic

QATBENCH = Path(sys.executable).with_name("qatbench")


def qatbench(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": str(columns)}
    return subprocess.run(
        [str(QATBENCH), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_version_prints_the_installed_version() -> None:
    proc = qatbench("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"qatbench {version('qatbench')}"


@pytest.mark.parametrize("command", ["run", "compare", "history", "report", "selftest"])
def test_help_shows_no_bool_metavar_and_the_real_default_store(command: str) -> None:
    proc = qatbench(command, "--help", columns=200)
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout
    assert "./mlruns" not in proc.stdout
    if "--tracking-uri" in proc.stdout:
        assert "sqlite:///mlruns/mlflow.db" in proc.stdout


def test_run_help_keeps_brackets_literal() -> None:
    text = qatbench("run", "--help", columns=200).stdout
    assert "mlflow:EXPERIMENT[@K]" in text and "qatbench[ray]" in text
    assert re.search(r"^\s+--resume\s+continue", text, re.M)  # a flag: no type column


def test_list_methods_fits_80_columns_without_python_reprs() -> None:
    proc = qatbench("list", "methods", columns=80)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in proc.stdout
    assert not re.search(r"\w+Config\(", proc.stdout)  # no pydantic repr
    ptq = proc.stdout.split("\nptq\n", 1)[1].split("\n\n", 1)[0]
    assert "  bits:     w2a4 w2a8" in ptq and "    reduce_range: true" in ptq
    assert '    observer: {"name": "minmax"}' in ptq  # a nested config, as YAML flow


def test_reports_are_written_with_the_users_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.json", "{}")
        assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o007)
        write_text_atomic(tmp_path / "report.html", "<html></html>")
        assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o660
    finally:
        os.umask(previous)


def test_baseline_previous_passes_over_partial_sweeps(
    sample_record: RunRecord, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qatbench.cli import run_command
    from qatbench.report import sources

    full = Sweep("s1", "2025-11-29T01:00:00+00:00", sample_record.trials, {})
    partial = Sweep("s2", "2025-11-29T02:00:00+00:00", sample_record.trials[:2], {}, True)
    here = Sweep("s3", "2025-11-29T03:00:00+00:00", sample_record.trials, {})
    monkeypatch.setattr(
        sources, "load_sweeps", lambda *_a, **_k: ("sqlite:///x.db", "1", [full, partial, here])
    )
    record = replace(
        sample_record,
        tracking={"uri": "sqlite:///x.db", "experiment": "quickstart", "sweep": "s3"},
    )
    assert run_command._judge_against_baseline(record, "previous", [], None) == 0
    out = capsys.readouterr().out
    assert "previous sweep s1 (skipping 1 partial)" in out

    # With only partial sweeps before it there is nothing to compare with.
    monkeypatch.setattr(
        sources, "load_sweeps", lambda *_a, **_k: ("sqlite:///x.db", "1", [partial, here])
    )
    assert run_command._judge_against_baseline(record, "previous", [], None) == 0
    assert "no full sweep of 'quickstart' before this one (1 partial" in capsys.readouterr().out


def test_the_log_is_moved_into_the_sweep_folder_and_keeps_late_writes(tmp_path: Path) -> None:
    from qatbench.cli.quiet import LOG_NAME, ThirdPartyLog

    log = ThirdPartyLog(tmp_path / "reports")
    log.write("before the sweep folder existed")
    held = open(log.path, "a")  # what a worker process holds open  # noqa: SIM115
    sweep = tmp_path / "reports" / "exp" / "20250101T000000Z"
    sweep.mkdir(parents=True)
    assert log.move_to(sweep) == sweep / LOG_NAME
    held.write("a late line\n")
    held.close()
    log.write("after")
    log.close()
    text = (sweep / LOG_NAME).read_text()
    assert text.splitlines() == ["before the sweep folder existed", "a late line", "after"]
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["exp"]  # no temporary left


def test_a_log_that_never_reached_a_sweep_leaves_nothing(tmp_path: Path) -> None:
    from qatbench.cli.quiet import ThirdPartyLog

    log = ThirdPartyLog(tmp_path / "reports" / "nested")
    log.write("the store was unreachable")
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_sweep_gets_a_log_of_its_own(tmp_path: Path) -> None:
    from qatbench.cli.quiet import ThirdPartyLog

    sweep = tmp_path / "reports" / "exp" / "20250101T000000Z"
    sweep.mkdir(parents=True)
    (sweep / "qatbench.log").write_text("the first attempt\n")
    log = ThirdPartyLog(tmp_path / "reports")
    log.write("the resume")
    assert log.move_to(sweep) == sweep / "qatbench.2.log" and log.moved
    log.close()
    assert (sweep / "qatbench.log").read_text() == "the first attempt\n"
    assert (sweep / "qatbench.2.log").read_text() == "the resume\n"


def test_validate_prints_no_line_of_the_libraries_a_plugin_imports(tmp_path) -> None:
    """torchao logs the CUDA libraries it cannot load and torch its deprecations on import:
    validate names torchao's method, and prints only its own lines."""
    exp = tmp_path / "torchao.yaml"
    exp.write_text(
        "name: t\nmodels: [mlp]\nmethods: [fp32, torchao_int8_dynamic]\nbits: [w8a8]\n"
        "runtimes: [torch]\ndata: {dataset: synthetic}\n"
    )
    proc = qatbench("validate", str(exp))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines()[0].startswith(f"{exp}: ok, 2 trials")
