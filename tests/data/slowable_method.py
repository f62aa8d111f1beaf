"""A method whose converted model is slower by a delay read from the environment.

The nightly gate tests inject a known slowdown with it: ``QATBENCH_TEST_DELAY_MS`` (like
every ``QATBENCH_*`` variable it reaches the trial's worker) adds a busy-wait of that many
milliseconds to every forward call; unset or 0, the model is the fp32 one unchanged.
"""

from __future__ import annotations

import os
import time

import torch

from qatbench.methods.fp32 import Fp32Method

DELAY_ENV = "QATBENCH_TEST_DELAY_MS"


class _Delayed(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, delay_s: float) -> None:
        super().__init__()
        self.inner, self.delay_s = inner, delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        end = time.perf_counter() + self.delay_s
        while time.perf_counter() < end:  # busy: a sleep's wake-up jitter would add noise
            pass
        return self.inner(x)


class SlowableMethod(Fp32Method):
    """fp32, plus the injected delay of ``QATBENCH_TEST_DELAY_MS`` per call."""

    name = "slowable"

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        delay_ms = float(os.environ.get(DELAY_ENV, "0") or 0)
        return _Delayed(model, delay_ms / 1e3) if delay_ms > 0 else model
