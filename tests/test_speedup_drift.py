"""benchmarks/speedup_drift.py: how far a speed-up moves between windows of blocks."""

from __future__ import annotations

import pytest

from benchmarks import speedup_drift


def _rounds(block_speedups: list[float], per_block: int = 3) -> tuple[list, list, list]:
    """Rounds whose fp32 time is the block's speed-up and candidate time 1 ms."""
    fp32, cand, blocks = [], [], []
    for b, s in enumerate(block_speedups):
        fp32 += [s] * per_block
        cand += [1.0] * per_block
        blocks += [b] * per_block
    return fp32, cand, blocks


def test_windows_double_while_two_fit_and_take_the_median_of_their_rounds() -> None:
    spreads = speedup_drift.window_spreads(*_rounds([2.0, 2.0, 3.0, 3.0, 2.0, 2.0, 3.0, 3.0]))
    assert [w.blocks for w in spreads] == [1, 2, 4]
    assert spreads[1].speedups == (2.0, 3.0, 2.0, 3.0)
    assert spreads[2].speedups == (2.5, 2.5)  # the median of 6 rounds at 2 and 6 at 3
    assert spreads[2].sd == 0.0 and spreads[2].far_apart == 0.0
    # 1-block windows: 4 at 2.0 and 4 at 3.0; the 16 mixed pairs of 28 are 50% apart
    assert spreads[0].far_apart == pytest.approx(16 / 28)
    assert spreads[0].sd == pytest.approx(0.5345 / 2.5, rel=1e-3)


def test_a_window_pair_is_judged_relative_to_the_smaller_speedup() -> None:
    spreads = speedup_drift.window_spreads(*_rounds([1.0, 1.09]), tolerance=0.10)
    assert spreads[0].far_apart == 0.0  # 9% apart
    spreads = speedup_drift.window_spreads(*_rounds([1.0, 1.11]), tolerance=0.10)
    assert spreads[0].far_apart == 1.0


def test_rounds_are_grouped_by_their_block_label_not_their_order() -> None:
    fp32, cand, blocks = [2.0, 4.0, 2.0, 4.0], [1.0] * 4, [0, 1, 0, 1]
    (w,) = speedup_drift.window_spreads(fp32, cand, blocks)
    assert w.speedups == (2.0, 4.0)
