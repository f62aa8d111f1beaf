"""Do the auto gates of the nightly recipe hold on this machine? A/A and injected nightlies.

A small nightly experiment (the seed MLP; fp32 and ``slowable``, an fp32 method whose
kernel can be slowed by a known amount; batch 1, torch, 1 thread) is run as separate
``qatbench run`` processes into one temporary MLflow store, as nightlies would be:

0. ``qatbench selftest`` into the store: the smallest slowdown this machine can see;
1. ``--history`` unchanged sweeps to give every trial a spread to take its threshold from;
2. ``--pairs`` A/A nightlies: unchanged sweeps, each judged with ``--baseline previous
   --gate speedup_vs_fp32:auto --gate latency_p50_ms:auto``; a breach is a false alarm;
3. ``--pairs`` injected nightlies: each starts from a copy of the store as it stood after
   the unchanged sweeps (quiet nights, then tonight's regression), runs with
   ``QATBENCH_TEST_DELAY_MS`` set to ``--slowdown`` (10%) of the slowable trial's median
   call time measured in the first sweep, and is judged the same way; a breach on the
   slowed trial is a detection.

    python benchmarks/nightly_gates.py                      # 4 + 20 + 20 runs
    python benchmarks/nightly_gates.py --history 4 --pairs 3  # a short check
    python benchmarks/nightly_gates.py --keep /tmp/gates      # keep the stores and reports

It prints one line per nightly and the tally; "Done when" of issue 21 asks for at most 1
false alarm in 20 and at least 19 detections in 20 (or a self-test saying the machine
cannot see 10%). Exit 0 when both hold at the size run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SLOW_TRIAL = "mlp-slowable-fp32-torch"
GATES = ["--gate", "speedup_vs_fp32:auto", "--gate", "latency_p50_ms:auto"]
EXPERIMENT = textwrap.dedent(
    """\
    schema_version: 1
    name: nightly_gates
    models: [mlp]
    methods: [fp32, slowable]
    bits: [fp32]
    runtimes: [torch]
    data: {dataset: digits, calibration_samples: 64, eval_samples: 128}
    measure: {batch_sizes: [1], max_time_s: 1.0, min_rounds: 10, per_layer: false, threads: 1}
    """
)
# Runs qatbench's CLI with the test plugin ``slowable`` registered (tests/data).
CHILD = (
    "import sys; sys.path.insert(0, 'tests'); "
    "from data.slowable_method import SlowableMethod; from qatbench import registry; "
    "registry.methods.register('slowable', SlowableMethod); "
    "from qatbench.cli import main; sys.argv = ['qatbench', *sys.argv[1:]]; main()"
)


def nightly(folder: Path, store: Path, delay_ms: float = 0.0) -> tuple[int, list[str]]:
    """One ``qatbench run`` process gated against the previous sweep: exit code, breaches."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    env.pop("QATBENCH_TEST_DELAY_MS", None)
    if delay_ms:
        env["QATBENCH_TEST_DELAY_MS"] = f"{delay_ms:.6f}"
    done = subprocess.run(
        [
            sys.executable, "-c", CHILD, "run", str(folder / "nightly_gates.yaml"),
            "--tracking-uri", f"sqlite:///{store}", "--output-dir", str(folder / "reports"),
            "--baseline", "previous", *GATES,
        ],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    text = done.stdout + done.stderr
    if done.returncode not in (0, 1):
        raise SystemExit(f"qatbench run failed ({done.returncode}):\n{text[-3000:]}")
    return done.returncode, [ln for ln in text.splitlines() if ln.startswith("breach:")]


def slow_trial_ms(folder: Path) -> float:
    """The slowable trial's median call time at batch 1 in the first report written."""
    first = min((folder / "reports").rglob("report.json"), key=lambda p: p.stat().st_mtime)
    trials = json.loads(first.read_text())["trials"]
    return float(next(t for t in trials if t["id"] == SLOW_TRIAL)["metrics"]["latency_p50_ms_b1"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=4, help="unchanged sweeps first")
    parser.add_argument("--pairs", type=int, default=20, help="A/A and injected nightlies")
    parser.add_argument("--slowdown", type=float, default=0.10, help="injected, relative")
    parser.add_argument(
        "--keep", type=Path, help="work in this folder and keep it (store, reports) afterwards"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qatbench-gates-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "nightly_gates.yaml").write_text(EXPERIMENT)
        store = folder / "mlflow.db"
        # what this machine says it can see, logged to the store as nightlies would have it
        selftest = subprocess.run(
            [sys.executable, "-m", "qatbench", "selftest", "--tracking-uri", f"sqlite:///{store}"],
            capture_output=True, text=True, check=False,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "200"},
        )  # fmt: skip
        print(selftest.stdout.strip(), flush=True)
        for i in range(args.history):
            nightly(folder, store)
            print(f"history {i + 1}/{args.history}", flush=True)
        delay_ms = args.slowdown * slow_trial_ms(folder)
        alarms = 0
        for i in range(args.pairs):
            code, breaches = nightly(folder, store)
            alarms += code != 0
            print(f"A/A {i + 1}: {'FALSE ALARM ' + '; '.join(breaches) if code else 'pass'}")
        quiet = folder / "quiet.db"
        shutil.copy(store, quiet)
        detections = 0
        for i in range(args.pairs):
            shutil.copy(quiet, store)
            code, breaches = nightly(folder, store, delay_ms)
            if args.keep:  # each injected nightly's store, for qatbench history
                shutil.copy(store, folder / f"injected-{i + 1}.db")
            caught = code == 1 and any(SLOW_TRIAL in b for b in breaches)
            detections += caught
            shown = "; ".join(breaches) if breaches else "missed"
            print(f"injected {i + 1}: {'detected ' if caught else ''}{shown}", flush=True)
    print(
        f"{alarms} of {args.pairs} A/A nightlies false alarms; {detections} of {args.pairs} "
        f"nightlies with a {args.slowdown:.0%} slowdown ({delay_ms * 1e3:.1f} us per call on "
        f"{SLOW_TRIAL}) detected; gates {' '.join(GATES[1::2])}; {args.history} sweeps of history"
    )
    return 0 if alarms <= args.pairs // 20 and detections >= args.pairs - args.pairs // 20 else 1


if __name__ == "__main__":
    sys.exit(main())
