"""Detection power of this machine: how small a slowdown two nightlies can tell apart.

Two nightlies differ by more than the noise inside one process: each is a fresh process,
with its own memory layout, frequency state and neighbours. :func:`measure_power` therefore
times a reference workload in ``processes`` separate Python processes, one after another
(each: REPEATS blocks of the workload and, interleaved, REPEATS blocks of the same workload
with 10% more work, ``busy_work(1.1 * n)`` whose time grows linearly with ``n``), and then
judges pairs of processes the way ``qatbench compare`` judges two nightlies: the
Mann-Whitney U test on one median per block, alpha 0.01, a 5% minimum effect.

- A/A: the reference blocks of process i against those of process j (i < j): a significant
  shift is a false alarm.
- Injected: the reference blocks of process i against the slowed blocks of process j: a
  significant slowdown is a detection of the real 10%.
- Smallest detectable slowdown: the reference blocks of j scaled by 1 + s, for s on
  SLOWDOWN_GRID; the smallest s detected in at least ``required`` of the pairs. This
  scaling is synthetic (the measured between-process noise, a known shift on top).

The pairs share processes (20 pairs from 7 or more processes), so they are not
independent trials: the counts are a fair estimate of the rates, not a binomial sample.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from qatbench.measure.stats import mann_whitney

WORK = 20_000
SLOWDOWN = 0.10
REPEATS = 8
PAIRS = 20
PROCESSES = 8
ALPHA = 0.01
MIN_EFFECT = 0.05
SLOWDOWN_GRID = (0.05, 0.06, 0.07, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25, 0.30, 0.40, 0.50)


def busy_work(n: int) -> int:
    """CPU-bound pure Python: the time grows linearly with ``n``."""
    return sum(range(n))


def _block_median(n: int, block_s: float) -> float:
    """Median seconds per call of ``busy_work(n)`` over rounds filling ``block_s``."""
    times: list[float] = []
    end = time.perf_counter() + block_s
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        busy_work(n)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child(work: int, slowdown: float, repeats: int, block_s: float) -> dict[str, list[float]]:
    """One process's measurement: reference and slowed block medians, interleaved."""
    slowed = round(work * (1.0 + slowdown))
    _block_median(work, block_s)  # warm-up
    ref, slow = [], []
    for _ in range(repeats):
        ref.append(_block_median(work, block_s))
        slow.append(_block_median(slowed, block_s))
    return {"ref": ref, "slow": slow}


@dataclass(frozen=True)
class Power:
    """What the machine can see between processes, under the test ``compare`` uses."""

    processes: int
    pairs: int
    between_process_sd: float  # relative sd of the processes' reference medians
    false_alarms: int  # of ``pairs`` A/A comparisons
    detections: int  # of ``pairs`` comparisons with the real 10% slowdown
    slowdown: float  # the injected slowdown (0.10)
    min_detectable: float  # smallest grid slowdown detected in >= required pairs; inf if none
    required: int

    def sentence(self) -> str:
        seen = (
            f"detects a slowdown of {self.min_detectable:.0%} or more in {self.required} "
            f"of {self.pairs} nightlies"
            if math.isfinite(self.min_detectable)
            else f"cannot reliably detect even a {SLOWDOWN_GRID[-1]:.0%} slowdown"
        )
        return (
            f"this machine {seen}; {self.false_alarms} of {self.pairs} false alarms; "
            f"a real {self.slowdown:.0%} slowdown detected in {self.detections} of {self.pairs} "
            f"(between-process sd {self.between_process_sd:.2%}, {self.processes} processes)"
        )


def _detected(a: list[float], b: list[float]) -> bool:
    test = mann_whitney(a, b, alpha=ALPHA, min_effect=MIN_EFFECT)
    return test.significant and test.ratio > 1.0


def judge(runs: list[dict[str, list[float]]], slowdown: float = SLOWDOWN) -> Power:
    """Tally the comparisons over measured processes (``child`` outputs)."""
    pairs = pairs_of(len(runs))[:PAIRS]
    required = math.ceil(0.95 * len(pairs))
    false_alarms = sum(
        mann_whitney(runs[i]["ref"], runs[j]["ref"], alpha=ALPHA, min_effect=MIN_EFFECT).significant
        for i, j in pairs
    )
    detections = sum(_detected(runs[i]["ref"], runs[j]["slow"]) for i, j in pairs)
    min_detectable = math.inf
    for s in SLOWDOWN_GRID:
        hits = sum(
            _detected(runs[i]["ref"], [v * (1.0 + s) for v in runs[j]["ref"]]) for i, j in pairs
        )
        if hits >= required:
            min_detectable = s
            break
    medians = [statistics.median(r["ref"]) for r in runs]
    sd = statistics.stdev(medians) / statistics.fmean(medians) if len(medians) > 1 else 0.0
    return Power(
        processes=len(runs),
        pairs=len(pairs),
        between_process_sd=sd,
        false_alarms=false_alarms,
        detections=detections,
        slowdown=slowdown,
        min_detectable=min_detectable,
        required=required,
    )


def pairs_of(n: int) -> list[tuple[int, int]]:
    """Every pair (i, j), i < j, neighbours first: consecutive processes, then two apart...
    (so the first 20 pairs spread over all processes instead of all holding process 0)."""
    return sorted(itertools.combinations(range(n), 2), key=lambda p: (p[1] - p[0], p[0]))


def processes_for(pairs: int) -> int:
    """The fewest processes whose pairs number at least ``pairs``."""
    n = 2
    while n * (n - 1) // 2 < pairs:
        n += 1
    return n


def measure_power(
    processes: int | None = None, block_s: float = 0.06, repeats: int = REPEATS
) -> Power:
    """Run the processes one after another (never side by side) and judge them."""
    count = processes or max(PROCESSES, processes_for(PAIRS))
    runs = []
    for _ in range(count):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "qatbench.measure.power",
                str(WORK),
                str(SLOWDOWN),
                str(repeats),
                str(block_s),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(done.stdout))
    return judge(runs)


if __name__ == "__main__":
    work, slowdown, repeats, block_s = sys.argv[1:5]
    print(json.dumps(child(int(work), float(slowdown), int(repeats), float(block_s))))
