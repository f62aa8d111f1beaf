"""How far does one trial's speed-up move while it is measured on this machine?

Runs one trial of an experiment in this process with ``measure.repeats`` blocks of
``--block-s`` seconds at one batch size, back to back, and prints the speed-up of each
block, then the whole measurement's value and interval. On a quiet machine the blocks
agree within a few percent; where they do not, two runs of the experiment cannot agree
better than the blocks do, and the interval (which resamples blocks) says so.

Then it cuts the blocks into windows of 1, 2, 4, ... consecutive blocks and prints how far
the speed-up of a window (the ratio of the medians of its rounds, as a trial computes it)
moves from window to window: the sd, and the share of pairs of windows more than 10%
apart. A window as long as a trial's measurement stands for one run of it, so this says
how long a trial must be timed on this machine for two runs to agree. Where the spread
stops falling as windows grow, the machine drifts on that scale and more time buys little.

    python benchmarks/speedup_drift.py experiments/quickstart.yaml mlp-fp32-fp32-onnxruntime
    python benchmarks/speedup_drift.py experiments/quickstart.yaml \\
        tiny_transformer-ptq-w8a8-onnxruntime --blocks 30 --block-s 0.5 --batch 1
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from qatbench.spec.schema import load_experiment
from qatbench.trial.lifecycle import run_trial


@dataclass(frozen=True)
class WindowSpread:
    """The speed-ups of consecutive, non-overlapping windows of ``blocks`` blocks each."""

    blocks: int
    speedups: tuple[float, ...]
    tolerance: float

    @property
    def sd(self) -> float:
        """Standard deviation over the mean (0 with fewer than two windows)."""
        if len(self.speedups) < 2:
            return 0.0
        return statistics.stdev(self.speedups) / statistics.mean(self.speedups)

    @property
    def far_apart(self) -> float:
        """The share of pairs of windows more than ``tolerance`` apart, relative to the
        smaller, as run_twice.py judges two runs."""
        pairs = list(itertools.combinations(self.speedups, 2))
        far = sum(abs(a - b) / min(a, b) > self.tolerance for a, b in pairs)
        return far / len(pairs) if pairs else 0.0


def window_spreads(
    fp32_ms: Sequence[float],
    candidate_ms: Sequence[float],
    block_of_round: Sequence[int],
    tolerance: float = 0.10,
) -> list[WindowSpread]:
    """Speed-ups of windows of 1, 2, 4, ... blocks, while at least two windows fit.

    Round i was timed in block ``block_of_round[i]`` (blocks numbered from 0 in time
    order); a window's speed-up is median(fp32) / median(candidate) over its rounds.
    """
    rounds_of: list[list[int]] = [[] for _ in range(max(block_of_round) + 1)]
    for i, block in enumerate(block_of_round):
        rounds_of[block].append(i)
    spreads = []
    size = 1
    while 2 * size <= len(rounds_of):
        speedups = []
        for start in range(0, len(rounds_of) - size + 1, size):
            window = [i for block in rounds_of[start : start + size] for i in block]
            speedups.append(
                statistics.median(fp32_ms[i] for i in window)
                / statistics.median(candidate_ms[i] for i in window)
            )
        spreads.append(WindowSpread(size, tuple(speedups), tolerance))
        size *= 2
    return spreads


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
    rounds = result.details["latency_samples"][f"b{n}"]
    print("  windows of consecutive blocks: speed-up sd, and pairs of windows >10% apart")
    for w in window_spreads(rounds["fp32_ms"], rounds["candidate_ms"], rounds["repeat_of_round"]):
        print(
            f"  {w.blocks * args.block_s:6.1f} s ({len(w.speedups):3d} windows):"
            f" sd {w.sd:5.1%}, {w.far_apart:4.0%} of pairs apart"
        )


if __name__ == "__main__":
    main()
