"""What a sweep tells its console while it runs: a bar on a terminal, a story in a log.

On a terminal, :class:`SweepProgress` draws one bar that names the running trial and the
phase it is in (``mlp-ptq-w8a8-torch · calibrate``). Anywhere else (CI, cron, ``nohup``,
``> log``) a bar would be printed once, at the end, so it writes lines instead, as things
happen: one per finished trial with its key figures and elapsed time
(:func:`~qatbench.report.summary.trial_line`), and one per long phase, written while it
runs once it has lasted :data:`LONG_PHASE_S` and again every :data:`PHASE_NOTE_EVERY_S`
(``mlp-fp32-fp32-torch: pretrain, 10 s so far``), so a log never sits silent through a
minute of pretraining.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from qatbench.report.summary import trial_line
from qatbench.results import TrialResult

LONG_PHASE_S = 10.0  # a log names a phase that has lasted this long, while it runs,
PHASE_NOTE_EVERY_S = 30.0  # ... and again after each further this many seconds


class SweepProgress:
    """The sweep's progress on ``console``: see the module doc."""

    def __init__(self, console: Console, total: int) -> None:
        self.console, self.total = console, total
        self.done = 0
        self.live = console.is_terminal
        self._started: dict[str, float] = {}
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.RLock()
        self._generation = 0  # bumped whenever a phase ends: stale notes stay unwritten
        self.long_phase_s, self.note_every_s = LONG_PHASE_S, PHASE_NOTE_EVERY_S

    @contextmanager
    def shown(self) -> Iterator[SweepProgress]:
        """The bar while in the block on a terminal; nothing to set up for a log."""
        if not self.live:
            if self.total:
                self._line(f"{self.total} trial(s) to run")
            try:
                yield self
            finally:
                self._cancel_timer()
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            self._progress = progress
            self._task = progress.add_task("starting", total=self.total)
            try:
                yield self
            finally:
                self._progress = None

    def started(self, trial_id: str) -> None:
        """A trial (or one of its timing passes) was handed to a worker."""
        self._started.setdefault(trial_id, time.monotonic())
        self._describe(trial_id)

    def phase(self, trial_id: str, phase: str) -> None:
        """The trial's worker entered ``phase`` (build, data, pretrain, ..., measure)."""
        self._started.setdefault(trial_id, time.monotonic())
        if self.live:
            self._describe(f"{trial_id} \u00b7 {phase}")  # middle dot
            return
        self._cancel_timer()
        with self._lock:
            self._note_later(trial_id, phase, self.long_phase_s)

    def _note_later(self, trial_id: str, phase: str, at_s: float) -> None:
        """Name the phase in the log once it has lasted ``at_s``, then every so often."""
        delay = at_s if at_s == self.long_phase_s else self.note_every_s
        generation = self._generation

        def note() -> None:
            with self._lock:
                if generation != self._generation:  # the phase ended meanwhile
                    return
                self._line(f"  {trial_id}: {phase}, {at_s:g} s so far")
                self._note_later(trial_id, phase, at_s + self.note_every_s)

        self._timer = threading.Timer(delay, note)
        self._timer.daemon = True
        self._timer.start()

    def finished(self, result: TrialResult, baseline: TrialResult | None) -> None:
        """A trial's result is in (run now, or recovered from an interrupted attempt)."""
        self.done += 1
        self._cancel_timer()
        began = self._started.pop(result.id, None)
        elapsed = time.monotonic() - began if began is not None else None
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=result.id, advance=1)
        if not self.live:
            self._line(f"[{self.done}/{self.total}] {trial_line(result, baseline, elapsed)}")

    def _cancel_timer(self) -> None:
        with self._lock:
            self._generation += 1
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _describe(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
