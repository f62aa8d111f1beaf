"""``qatbench history EXPERIMENT --metric M --json``: an injected step is marked at its sweep,
in the JSON a job reads and in the HTML, from a real MLflow store."""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

import pytest

from qatbench.results import TrialResult

METRIC = "speedup_vs_fp32_b1"
VALUES = [2.00, 2.02, 1.99, 2.01, 2.00, 1.60, 1.61, 1.59, 1.60]  # -20% from sweep-5


def test_history_marks_the_injected_step_at_its_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qatbench.cli import main
    from qatbench.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "nightly")
    for i, value in enumerate(VALUES):
        for tid, v in (("mlp-ptq-w8a8-torch", value), ("mlp-fp32-fp32-torch", 1.0)):
            trial = TrialResult(tid, "mlp", "ptq", "w8a8", "torch", "finished", {METRIC: v})
            tracker.log_trial(trial, params={}, tags={}, sweep=f"sweep-{i}")
    out, js = tmp_path / "history.html", tmp_path / "history.json"
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(
        sys,
        "argv",
        ["qatbench", "history", "nightly", "--metric", METRIC, "--tracking-uri", uri,
         "-o", str(out), "--json", str(js)],
    )  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main()
    assert not exited.value.code
    stdout = capsys.readouterr().out
    assert "step: mlp-ptq-w8a8-torch" in stdout and "from sweep sweep-5 (#5)" in stdout
    data = json.loads(js.read_text())
    steps = {s["trial"]: s["steps"] for s in data["series"]}
    assert steps["mlp-fp32-fp32-torch"] == []
    (step,) = steps["mlp-ptq-w8a8-torch"]
    assert step["sweep"] == "sweep-5" and step["change"] == pytest.approx(-0.2, abs=0.01)
    html = out.read_text()
    assert html.count('<g class="step bad">') == 1 and re.search(r"step -20\.\d%", html)


@pytest.mark.parametrize("sweeps", [1, 8, 9, 17, 27, 60])
def test_the_time_axis_labels_the_first_and_last_sweeps_and_never_crowds(sweeps: int) -> None:
    from types import SimpleNamespace

    from qatbench.report.pages import MAX_X_LABELS, _x_ticks
    from qatbench.report.svg import Scale

    hist = SimpleNamespace(
        sweeps=[(f"s{i}", f"2026-12-05T{i // 60:02d}:{i % 60:02d}") for i in range(sweeps)]
    )
    sx = Scale(-0.5, sweeps - 0.5, 0.0, 560.0)
    ticks = _x_ticks(hist, sx)  # type: ignore[arg-type]
    assert ticks[0]["pos"] == sx(0) and ticks[-1]["pos"] == sx(sweeps - 1)
    assert len(ticks) <= MAX_X_LABELS
    gaps = [b["pos"] - a["pos"] for a, b in itertools.pairwise(ticks)]
    assert all(g >= min(560.0 / MAX_X_LABELS, 560.0 / sweeps) - 1e-6 for g in gaps), gaps
