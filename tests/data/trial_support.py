"""Running one trial inside the test process (no worker), leaving the process as it was."""

from __future__ import annotations

from pathlib import Path

import torch

from qatbench.results import TrialResult
from qatbench.spec.schema import TrialSpec
from qatbench.trial.lifecycle import run_trial


def run_here(trial: TrialSpec, out_dir: Path) -> TrialResult:
    """run_trial in this process, restoring the thread count and RNG state it sets."""
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            return run_trial(trial, out_dir)
    finally:
        torch.set_num_threads(threads)
