"""Does the run-to-run comparison catch real slowdowns and ignore noise?

Times the seed MLP (fp32, batch 1, torch eager, 1 thread) the way two nightly runs would:
run A and run B are independent timing runs of the same model. 20 pairs are A/A (nothing
changed) and 20 are A/B with a 1.5x slowdown injected into B (a busy-wait of half the
model's median call time after every call). Each pair is judged by the test ``qatbench
compare`` uses on timings (Mann-Whitney U with a 5% effect threshold, alpha 0.01).

    python benchmarks/aa_detection.py            # prints one line per pair and the tally

A trustworthy comparison has at most 1 false alarm in the A/A pairs and at least 19
detections in the A/B pairs.
"""

from __future__ import annotations

import statistics
import time

import torch

from qatbench.measure.stats import mann_whitney
from qatbench.measure.timing import TimingSettings, time_callable
from qatbench.models.mlp import build_mlp

PAIRS = 20
SLOWDOWN = 1.5
SETTINGS = TimingSettings(warmup_s=0.1, min_round_s=0.002, min_rounds=15, max_time_s=0.6)


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = build_mlp()
    model.eval()
    x = torch.randn(1, 28, 28)
    with torch.inference_mode():

        def plain() -> object:
            return model(x)

        median_s = statistics.median(time_callable(plain, SETTINGS).per_call_s)
        extra_s = (SLOWDOWN - 1) * median_s

        def slowed() -> object:
            out = model(x)
            spin(extra_s)
            return out

        false_alarms = detections = 0
        for kind, candidate in (("A/A", plain), ("A/B 1.5x", slowed)):
            for i in range(PAIRS):
                a = time_callable(plain, SETTINGS).per_call_s
                b = time_callable(candidate, SETTINGS).per_call_s
                test = mann_whitney(a, b)
                flagged = test.significant and test.ratio > 1
                if kind == "A/A":
                    false_alarms += flagged
                else:
                    detections += flagged
                print(
                    f"{kind:9s} pair {i + 1:2d}: ratio {test.ratio:.3f} p {test.p_value:.2e} "
                    f"{'REGRESSION' if flagged else 'ok'}"
                )
    print(
        f"median call {median_s * 1e3:.3f} ms; A/A false alarms: {false_alarms}/{PAIRS}; "
        f"1.5x detections: {detections}/{PAIRS}"
    )


if __name__ == "__main__":
    main()
