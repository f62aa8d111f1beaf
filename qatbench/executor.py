"""Run a trial in its own worker process, so its memory and its crashes stay its own.

Workers come from a ``forkserver`` that has imported torch once, so each trial starts in
a fraction of a second with a clean heap. The worker reports the phase it enters and then
its result over a pipe; a worker that dies (segfault, abort, out-of-memory kill) or
overruns its timeout becomes a failed result naming the phase it was in.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from qatbench.results import TrialFailure, TrialResult
from qatbench.spec import TrialSpec

_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "onnxruntime", "qatbench.trial"])
    return _CTX


@dataclass(frozen=True)
class WorkerContext:
    """What a worker forked from the long-lived forkserver must take from its parent now:
    the import path, qatbench's environment variables and directly registered plugins."""

    sys_path: tuple[str, ...]
    env: dict[str, str]
    methods: dict[str, str]
    models: dict[str, str]

    @classmethod
    def capture(cls) -> WorkerContext:
        from qatbench import registry

        return cls(
            sys_path=tuple(sys.path),
            env={k: v for k, v in os.environ.items() if k.startswith("QATBENCH_")},
            methods=registry.methods.direct_registrations(),
            models=registry.models.direct_registrations(),
        )

    def apply(self) -> None:
        from qatbench import registry

        sys.path[:] = list(self.sys_path)
        os.environ.update(self.env)
        registry.methods.register_from(self.methods)
        registry.models.register_from(self.models)


def _worker(trial: TrialSpec, out_dir: str, conn: Connection, context: WorkerContext) -> None:
    from qatbench.trial import run_trial

    context.apply()

    result = run_trial(trial, Path(out_dir), report=lambda phase: conn.send(("phase", phase)))
    conn.send(("result", result.to_dict()))
    conn.close()


class LocalProcessExecutor:
    """Runs trials one at a time, each in a fresh worker process."""

    def __init__(self) -> None:
        self._current: Any = None

    def run(self, trial: TrialSpec, out_dir: Path, timeout_s: float) -> TrialResult:
        out_dir.mkdir(parents=True, exist_ok=True)
        ctx = _context()
        parent, child = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_worker, args=(trial, str(out_dir), child, WorkerContext.capture()), daemon=True
        )
        self._current = process
        process.start()
        child.close()
        phase, deadline = "start", time.monotonic() + timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return _failed(trial, phase, f"timed out after {timeout_s:g} s")
                if parent.poll(min(remaining, 0.5)):
                    try:
                        kind, payload = parent.recv()
                    except EOFError:
                        return _died(trial, phase, process)
                    if kind == "phase":
                        phase = payload
                    else:
                        return TrialResult.from_dict(payload)
                elif not process.is_alive():
                    return _died(trial, phase, process)
        finally:
            self.stop()
            parent.close()

    def stop(self) -> None:
        """Kill the running worker, if any (timeouts, Ctrl-C)."""
        process, self._current = self._current, None
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(5)


def _died(trial: TrialSpec, phase: str, process: Any) -> TrialResult:
    process.join(5)
    code = process.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        reason = f"worker process killed by {name}"
        if name == "SIGKILL":
            reason += " (out of memory?)"
    else:
        reason = f"worker process exited with code {code} before reporting a result"
    return _failed(trial, phase, reason)


def _failed(trial: TrialSpec, phase: str, reason: str) -> TrialResult:
    return TrialResult(
        id=trial.id,
        model=trial.model.name,
        method=trial.method.name,
        bits=trial.bits,
        runtime=trial.runtime,
        status="failed",
        error=TrialFailure(phase, reason),
    )
