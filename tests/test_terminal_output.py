"""What ``qatbench run`` tells a terminal and a log: the results table, a line per trial,
the phase of a long trial, and nothing of the libraries underneath (issue 24)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from qatbench.report.summary import NARROW_WIDTH, results_table, trial_line
from qatbench.results import RunRecord, TrialFailure
from qatbench.sweep.progress import SweepProgress

QATBENCH = Path(sys.executable).with_name("qatbench")
TIMES = "\u00d7"  # the multiplication sign after a ratio


def _render(record: RunRecord, width: int, wide: bool = False) -> list[str]:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    console.print(results_table(record, wide=wide))
    return console.file.getvalue().splitlines()  # type: ignore[attr-defined]


def test_results_table_fits_100_columns_and_names_every_trial(sample_record) -> None:
    failed = next(t for t in sample_record.trials if t.id == "mlp-ptq-w4a8-torch")
    record = sample_record.with_trial(
        replace(failed, status="failed", error=TrialFailure("measure", "boom"), metrics={})
    )
    lines = _render(record, NARROW_WIDTH)
    assert max(len(line) for line in lines) <= NARROW_WIDTH
    text = "\n".join(lines)
    assert "…" not in text  # nothing cut short at 100 columns
    for header in ("status", "size", "speed-up b1 [95% CI]", "acc %", "Δ fp32"):
        assert header in lines[0], header
    row = next(line for line in lines if "ptq w8a8 · onnxruntime" in line)
    assert "ok" in row and f"2.71{TIMES} [2.59, 2.83]" in row  # speed-up with its interval
    assert re.search(r"ptq w4a8 · torch\s+FAILED", text)
    models = {t.model for t in record.trials}
    assert all(any(line.strip() == m for line in lines) for m in models)  # a heading per model


def test_without_a_task_metric_the_table_has_no_empty_task_columns(sample_record) -> None:
    """Synthetic data has no labels: the room of the task columns goes to the trial names."""
    trials = tuple(
        replace(t, metrics={k: v for k, v in t.metrics.items() if "accuracy" not in k})
        for t in sample_record.trials
    )
    lines = _render(replace(sample_record, trials=trials), NARROW_WIDTH)
    assert "acc %" not in lines[0] and "Δ fp32" not in lines[0] and "task" not in lines[0]
    assert "speed-up b1 [95% CI]" in lines[0]


def test_wide_table_adds_ids_and_error_columns(sample_record) -> None:
    lines = _render(sample_record, 400, wide=True)
    assert "mse" in lines[0] and "p50 ms b1" in lines[0] and "speed-up b64" in lines[0]
    assert any("mlp-ptq-w8a8-onnxruntime" in line for line in lines)


def test_trial_line_names_status_figures_and_time(sample_record) -> None:
    baseline = next(t for t in sample_record.trials if t.id == "mlp-fp32-fp32-torch")
    trial = next(t for t in sample_record.trials if t.id == "mlp-ptq-w8a8-onnxruntime")
    line = trial_line(trial, baseline, elapsed=12.34)
    assert line.startswith("mlp-ptq-w8a8-onnxruntime ok in 12.3 s: size ")
    assert f"speed-up b1 2.71{TIMES} [2.59, 2.83]" in line and "accuracy " in line and "(Δ " in line
    failed = replace(trial, status="failed", error=TrialFailure("convert", "killed by SIGABRT"))
    assert trial_line(failed, baseline, elapsed=2.0) == (
        "failed mlp-ptq-w8a8-onnxruntime: convert: killed by SIGABRT (after 2.0 s)"
    )


def test_a_log_gets_a_line_per_trial_and_per_long_phase(sample_record) -> None:
    file = io.StringIO()
    console = Console(file=file, force_terminal=False, width=200)
    trials = [t for t in sample_record.trials if t.model == "mlp"][:2]
    progress = SweepProgress(console, total=2)
    progress.long_phase_s, progress.note_every_s = 0.05, 0.3
    assert not progress.live
    with progress.shown():
        progress.started(trials[0].id)
        progress.phase(trials[0].id, "build")
        progress.phase(trials[0].id, "pretrain")  # lasts: named while it runs, twice
        time.sleep(0.5)
        progress.finished(trials[0], None)
        progress.started(trials[1].id)
        progress.phase(trials[1].id, "measure")  # ends before it counts as long
        progress.finished(trials[1], trials[0])
        time.sleep(0.2)
    lines = file.getvalue().splitlines()
    assert lines[0] == "2 trial(s) to run"
    notes = [line for line in lines if line.startswith("  ")]
    # While pretrain lasted: after 0.05 s, then every 0.3 s (how many depends on the clock).
    assert notes[:2] == [
        f"  {trials[0].id}: pretrain, 0.05 s so far",
        f"  {trials[0].id}: pretrain, 0.35 s so far",
    ]
    assert all(": pretrain, " in note for note in notes)  # build and measure were short
    done = [line for line in lines[1:] if not line.startswith("  ")]
    assert done[0].startswith(f"[1/2] {trials[0].id} ok in 0.")
    assert done[1].startswith(f"[2/2] {trials[1].id} ok in ")
    assert lines.index(done[0]) > lines.index(notes[-1])  # no note once the trial is done


def test_the_terminal_bar_names_the_trial_and_its_phase(sample_record) -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    progress = SweepProgress(console, total=1)
    trial = sample_record.trials[0]
    with progress.shown():
        progress.started(trial.id)
        progress.phase(trial.id, "calibrate")
        assert progress._progress is not None
        assert progress._progress.tasks[0].description == f"{trial.id} · calibrate"
        progress.finished(trial, None)
        assert progress._progress.tasks[0].completed == 1


@pytest.mark.slow
def test_run_under_nohup_writes_a_line_per_trial_and_a_results_table(tmp_path: Path) -> None:
    """Done-when: without a terminal, a line per trial as it finishes; a table at the end;
    and no line from a third-party library's warnings or progress (they go to the log)."""
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        textwrap.dedent(f"""\
        name: told
        models:
          - name: mlp
            options: {{hidden: [32]}}
        methods: [fp32, ptq]
        bits: [w8a8]
        runtimes: [torch]
        data: {{dataset: digits, pretrain_epochs: 1, eval_samples: 64, calibration_samples: 32}}
        measure: {{batch_sizes: [1], max_time_s: 0.2, min_rounds: 5, warmup_s: 0.01,
                   per_layer: false}}
        tracking: {{uri: "sqlite:///{tmp_path / "mlruns" / "mlflow.db"}"}}
        """)
    )
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "QATBENCH_CACHE": str(tmp_path / "cache"),
        "PYTHONWARNINGS": "always",  # every warning a library raises would show
    }
    env.pop("COLUMNS", None)
    proc = subprocess.run(
        [str(QATBENCH), "run", str(experiment), "--output-dir", str(tmp_path / "reports")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    err = proc.stderr.splitlines()
    assert err[0] == "2 trial(s) to run"
    assert err[1].startswith("[1/2] mlp-fp32-fp32-torch ok in ")
    assert err[2].startswith("[2/2] mlp-ptq-w8a8-torch ok in ")
    assert "accuracy" in err[2] and "speed-up b1" in err[2]
    own = re.compile(r"^(\d+ trial\(s\) to run|\[\d+/\d+\] |  \S+: \w+, [\d.]+ s so far)")
    assert [line for line in err if not own.match(line)] == []  # nothing from libraries
    out = proc.stdout.splitlines()
    assert "speed-up b1 [95% CI]" in out[0] and max(len(line) for line in out[:5]) <= 100
    assert any("ptq w8a8 · torch" in line and " ok " in line for line in out)
    (log,) = (tmp_path / "reports" / "told").glob("*/qatbench.log")
    assert "mlflow" in log.read_text()  # the store's own messages went to the log


LEAKY_WORKER = """\
import os, signal, sys
from pathlib import Path

from qatbench.sweep import executor


def leak():  # a worker killed with a semaphore it never released
    import multiprocessing

    held = multiprocessing.get_context("forkserver").Semaphore()
    os.kill(os.getpid(), signal.SIGKILL)
    return held


if __name__ == "__main__":
    if len(sys.argv) > 1:
        executor.start_worker_server(Path(sys.argv[1]))
    process = executor._context().Process(target=leak)
    process.start()
    process.join()
"""


@pytest.mark.parametrize("quiet", [False, True], ids=["verbose", "quiet"])
def test_the_leaked_semaphore_note_at_exit_goes_to_the_log(tmp_path: Path, quiet: bool) -> None:
    """Workers are killed, so what they held leaks; multiprocessing's resource tracker says
    so when the parent exits. Started quietly, it says so in the log, not on stderr."""
    script, log = tmp_path / "leaky.py", tmp_path / "qatbench.log"
    script.write_text(LEAKY_WORKER)
    args = [sys.executable, str(script), *([str(log)] if quiet else [])]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    note = "leaked semaphore objects to clean up at shutdown"
    if quiet:
        assert note not in proc.stderr, proc.stderr
        # the tracker outlives the parent by a moment: it writes the note after it exits
        deadline = time.monotonic() + 10
        while note not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert note in log.read_text()
    else:  # the control: without the log the note is there to catch
        assert note in proc.stderr


def test_a_language_model_table_shows_next_token_accuracy_without_minus_zero() -> None:
    from test_report_lm import _lm_record

    lines = _render(_lm_record(), NARROW_WIDTH)
    assert "next-token acc %" in lines[0] and max(len(line) for line in lines) <= NARROW_WIDTH
    text = "\n".join(lines)
    assert "-0.00" not in text  # a change that rounds to nothing is +0.00
    assert re.search(r"rtn w4 · onnxruntime\s+ok .* 47\.90\s+-0\.10", text)
    wide = _render(_lm_record(), 400, wide=True)
    assert "ppl" in wide[0]
