"""Do two runs of an experiment agree? Runs it twice and compares a metric trial by trial.

Runs ``qatbench run EXPERIMENT`` twice back to back into one temporary MLflow store (or,
with ``--reports``, reads two report.json files already written) and prints, for every
trial in both, the metric with its interval in each run, the relative difference
``|a - b| / min(a, b)``, and how many trials agree within ``--tolerance``. This is the
reproducibility check of the measurement issue ("the quickstart twice agrees within 10%
on speedup_vs_fp32_b1"); the README's "How timing works" says what it gave on the VM
qatbench was built on. Exit 0 when every trial agrees, 1 otherwise.

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
from pathlib import Path
from typing import Any


def _interval_keys(metric: str) -> tuple[str, str] | None:
    """The metrics holding a speed-up's interval (``speedup_ci_low_bN``, ...), else None."""
    batch = metric.removeprefix("speedup_vs_fp32_b")
    return None if batch == metric else (f"speedup_ci_low_b{batch}", f"speedup_ci_high_b{batch}")


def agreement(
    a: dict[str, Any], b: dict[str, Any], metric: str, tolerance: float
) -> tuple[list[str], int, int]:
    """Lines comparing ``metric`` in two report.json documents, trials agreeing, trials."""
    first = {t["id"]: t["metrics"] for t in a["trials"] if metric in t.get("metrics", {})}
    second = {t["id"]: t["metrics"] for t in b["trials"] if metric in t.get("metrics", {})}
    keys = _interval_keys(metric)
    lines, agreeing, common = [], 0, [tid for tid in first if tid in second]
    for tid in common:
        shown = []
        for m in (first[tid], second[tid]):
            value = f"{m[metric]:.3f}"
            if keys and all(k in m for k in keys):
                value += f" [{m[keys[0]]:.2f}, {m[keys[1]]:.2f}]"
            shown.append(f"{value:20s}")
        va, vb = first[tid][metric], second[tid][metric]
        diff = abs(va - vb) / min(abs(va), abs(vb)) if min(abs(va), abs(vb)) > 0 else float("inf")
        ok = diff <= tolerance
        agreeing += ok
        lines.append(f"{tid:44s} {shown[0]} {shown[1]} {diff:6.1%} {'ok' if ok else 'MISS'}")
    return lines, agreeing, len(common)


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
    lines, agreeing, total = agreement(docs[0], docs[1], args.metric, args.tolerance)
    print(f"{'trial':44s} {'first':20s} {'second':20s}   diff")
    print("\n".join(lines))
    print(f"{agreeing}/{total} trials within {args.tolerance:.0%} on {args.metric}")
    sys.exit(0 if total and agreeing == total else 1)


if __name__ == "__main__":
    main()
