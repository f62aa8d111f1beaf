"""Do two runs of an experiment agree? Runs it twice and compares a metric trial by trial.

Runs ``qatbench run EXPERIMENT`` twice back to back into one temporary MLflow store (or,
with ``--reports``, reads two report.json files already written) and prints, for every
trial in both, the metric with its interval in each run, the relative difference
``|a - b| / min(a, b)``, and how many trials agree within ``--tolerance``. Where the
metric has an interval it also says whether the two runs' intervals overlap: a difference
beyond the tolerance with overlapping intervals is one the runs' own statistics allowed
(the measurement was not precise enough); apart intervals are drift between the runs.

This is the reproducibility check of the measurement issue ("the quickstart twice agrees
within 10% on speedup_vs_fp32_b1"); the README's "How timing works" says what it gave on
the VM qatbench was built on. Exit 0 when every trial agrees, 1 otherwise.

    python benchmarks/run_twice.py experiments/quickstart.yaml
    python benchmarks/run_twice.py --reports a/report.json b/report.json --tolerance 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _interval_keys(metric: str) -> tuple[str, str] | None:
    """The metrics holding a speed-up's interval (``speedup_ci_low_bN``, ...), else None."""
    batch = metric.removeprefix("speedup_vs_fp32_b")
    return None if batch == metric else (f"speedup_ci_low_b{batch}", f"speedup_ci_high_b{batch}")


@dataclass
class Agreement:
    """Two runs compared on one metric: a line per trial in both, and the counts."""

    lines: list[str]
    agreeing: int  # within the tolerance
    compared: int  # trials in both runs
    with_intervals: int = 0  # trials with an interval in both runs
    overlapping: int = 0  # of those, trials whose two intervals overlap


def agreement(a: dict[str, Any], b: dict[str, Any], metric: str, tolerance: float) -> Agreement:
    """``metric`` compared trial by trial in two report.json documents."""
    first = {t["id"]: t["metrics"] for t in a["trials"] if metric in t.get("metrics", {})}
    second = {t["id"]: t["metrics"] for t in b["trials"] if metric in t.get("metrics", {})}
    keys = _interval_keys(metric)
    result = Agreement([], 0, 0)
    for tid in (tid for tid in first if tid in second):
        ma, mb = first[tid], second[tid]
        intervals = [
            (m[keys[0]], m[keys[1]]) for m in (ma, mb) if keys and all(k in m for k in keys)
        ]
        shown = [f"{m[metric]:.3f}" for m in (ma, mb)]
        overlap = ""
        if len(intervals) == 2:
            shown = [
                f"{v} [{lo:.2f}, {hi:.2f}]" for v, (lo, hi) in zip(shown, intervals, strict=True)
            ]
            apart = max(lo for lo, _ in intervals) > min(hi for _, hi in intervals)
            overlap = "apart" if apart else "overlap"
            result.with_intervals += 1
            result.overlapping += not apart
        va, vb = ma[metric], mb[metric]
        diff = abs(va - vb) / min(abs(va), abs(vb)) if min(abs(va), abs(vb)) > 0 else float("inf")
        ok = diff <= tolerance
        result.compared += 1
        result.agreeing += ok
        verdict = "ok" if ok else "MISS"
        result.lines.append(
            f"{tid:44s} {shown[0]:20s} {shown[1]:20s} {diff:6.1%} {verdict:4s} {overlap}".rstrip()
        )
    return result


def _run(experiment: Path, store: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [
        sys.executable,
        "-m",
        "qatbench",
        "run",
        str(experiment),
        "--output-dir",
        str(out),
        "--tracking-uri",
        f"sqlite:///{store / 'mlflow.db'}",
    ]
    subprocess.run(command, check=True, env=env)
    (report,) = out.glob("*/*/report.json")
    return dict(json.loads(report.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, nargs="?")
    parser.add_argument("--reports", type=Path, nargs=2, metavar=("A", "B"))
    parser.add_argument("--metric", default="speedup_vs_fp32_b1")
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args()
    if (args.experiment is None) == (args.reports is None):
        parser.error("give an experiment YAML or --reports A B")

    if args.reports:
        docs = [json.loads(p.read_text()) for p in args.reports]
    else:
        with tempfile.TemporaryDirectory(prefix="qatbench-twice-") as tmp:
            store = Path(tmp)
            docs = [_run(args.experiment, store, store / f"run{i}") for i in (1, 2)]
    found = agreement(docs[0], docs[1], args.metric, args.tolerance)
    print(f"{'trial':44s} {'first':20s} {'second':20s}   diff      intervals")
    print("\n".join(found.lines))
    summary = (
        f"{found.agreeing}/{found.compared} trials within {args.tolerance:.0%} on {args.metric}"
    )
    if found.with_intervals:
        summary += f"; intervals overlap in {found.overlapping}/{found.with_intervals}"
    print(summary)
    sys.exit(0 if found.compared and found.agreeing == found.compared else 1)


if __name__ == "__main__":
    main()
