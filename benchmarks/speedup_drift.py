"""How far does one trial's speed-up move while it is measured on this machine?

Runs one trial of an experiment in this process with ``measure.repeats`` blocks of
``--block-s`` seconds at one batch size, back to back, and prints the speed-up of each
block, then the whole measurement's value and interval. On a quiet machine the blocks
agree within a few percent; where they do not, two runs of the experiment cannot agree
better than the blocks do, and the interval (which resamples blocks) says so.

    python benchmarks/speedup_drift.py experiments/quickstart.yaml mlp-fp32-fp32-onnxruntime
    python benchmarks/speedup_drift.py experiments/quickstart.yaml \\
        tiny_transformer-ptq-w8a8-onnxruntime --blocks 30 --block-s 0.5 --batch 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from qatbench.spec import load_experiment
from qatbench.trial import run_trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("trial", help="a trial id, as `qatbench validate` lists them")
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--block-s", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    trials = {t.id: t for t in load_experiment(args.experiment).expand()}
    if args.trial not in trials:
        parser.error(f"no trial {args.trial!r} in {args.experiment}: {', '.join(trials)}")
    trial = trials[args.trial]
    measure = trial.measure.model_copy(
        update={
            "batch_sizes": [args.batch],
            "repeats": args.blocks,
            "max_time_s": args.blocks * args.block_s,
            "per_layer": False,
        }
    )
    with tempfile.TemporaryDirectory() as out:
        result = run_trial(replace(trial, measure=measure), Path(out))
    if not result.ok:
        raise SystemExit(f"{args.trial} failed: {result.error}")
    blocks = result.details["latency_samples"][f"b{args.batch}"]["speedup_per_repeat"]
    m = result.metrics
    n = args.batch
    print(f"{args.trial}, batch {n}, {len(blocks)} blocks of {args.block_s} s:")
    print("  " + " ".join(f"{v:.2f}" for v in blocks))
    spread = statistics.stdev(blocks) / statistics.mean(blocks)
    print(
        f"  blocks: min {min(blocks):.2f}, max {max(blocks):.2f}, sd {spread:.1%} of the mean;"
        f" whole: {m[f'speedup_vs_fp32_b{n}']:.3f}"
        f" [{m[f'speedup_ci_low_b{n}']:.3f}, {m[f'speedup_ci_high_b{n}']:.3f}]"
    )


if __name__ == "__main__":
    main()
