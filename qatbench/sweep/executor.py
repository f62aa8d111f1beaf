"""Run a trial in its own worker process, so its memory and its crashes stay its own.

Workers come from a ``forkserver`` that has imported torch once, so each trial starts in
a fraction of a second with a clean heap. The worker reports the phase it enters and then
its result over a pipe; a worker that dies (segfault, abort, out-of-memory kill) or
overruns its timeout becomes a failed result naming the phase it was in.

:func:`results_as_completed` drives a batch of trials through any executor: one that can
run several at once (:class:`ConcurrentExecutor`, e.g. the Ray executor) hands results back
as they finish; any other runs them one at a time, as the local executor must (latency
measurements need a quiet machine).

Each worker leads a process group of its own, so a Ctrl-C at the terminal reaches only the
parent, which then kills the whole group (the worker and anything it started). A worker
also holds the read end of a "lifeline" pipe whose write end only the parent has: when the
parent dies, even by SIGKILL, the pipe reaches end-of-file and the worker kills its group.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from qatbench.results import TrialFailure, TrialResult
from qatbench.spec.schema import TrialSpec

_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        # sklearn.datasets (the digits data) costs seconds to import: once here, not per trial.
        _CTX.set_forkserver_preload(
            ["torch", "onnxruntime", "sklearn.datasets", "qatbench.trial.lifecycle"]
        )
    return _CTX


def start_worker_server(output: Path | None = None) -> None:
    """Start the forkserver that workers fork from (and multiprocessing's resource tracker)
    now, with their stdout and stderr on the file ``output`` when given, so that whatever
    libraries print in workers (import-time warnings, progress bars, leak notes at exit)
    goes there. A no-op for what already runs."""
    from multiprocessing import forkserver, resource_tracker

    _context()
    if output is None:
        forkserver.ensure_running()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    saved = (os.dup(1), os.dup(2))
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        resource_tracker.ensure_running()  # the forkserver shares it
        forkserver.ensure_running()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)


@dataclass(frozen=True)
class WorkerContext:
    """What a worker forked from the long-lived forkserver must take from its parent now:
    the import path, the working directory (relative paths, the default data cache),
    qatbench's environment variables and directly registered plugins; and the ``cores``
    it is pinned to, if any (the Ray executor gives each trial cores of its own)."""

    sys_path: tuple[str, ...]
    env: dict[str, str]
    methods: dict[str, str]
    models: dict[str, str]
    cwd: str = ""
    cores: tuple[int, ...] = ()

    @classmethod
    def capture(cls) -> WorkerContext:
        from qatbench import registry

        return cls(
            sys_path=tuple(sys.path),
            env={k: v for k, v in os.environ.items() if k.startswith("QATBENCH_")},
            methods=registry.methods.direct_registrations(),
            models=registry.models.direct_registrations(),
            cwd=os.getcwd(),
        )

    def apply(self) -> None:
        from qatbench import registry

        sys.path[:] = list(self.sys_path)
        if self.cwd and os.path.isdir(self.cwd):  # another node of a cluster may lack it
            os.chdir(self.cwd)
        os.environ.update(self.env)
        if self.cores:
            os.sched_setaffinity(0, self.cores)
        registry.methods.register_from(self.methods)
        registry.models.register_from(self.models)


class Executor(Protocol):
    """Runs one trial somewhere isolated and always returns its result (see module doc)."""

    def run(self, trial: TrialSpec, out_dir: Path, timeout_s: float) -> TrialResult: ...

    def stop(self) -> None:
        """Kill whatever is running now (timeouts, Ctrl-C); idempotent."""


@dataclass(frozen=True)
class Job:
    """One trial to run: its spec, the folder its artifacts go to and its time limit;
    ``pass_index`` numbers it among the trial's timing passes (measure.passes)."""

    trial: TrialSpec
    out_dir: Path
    timeout_s: float
    pass_index: int = 0


@runtime_checkable
class ConcurrentExecutor(Executor, Protocol):
    """An executor that may run several trials at once (on a cluster, say)."""

    def run_many(self, jobs: list[Job]) -> Iterator[tuple[Job, TrialResult]]:
        """Start every job and yield each with its result as it finishes, in any order.

        Every job comes back exactly once, a failure as a failed result. Closing the
        iterator early (an interruption) leaves the rest to :meth:`Executor.stop`.
        """
        ...


def results_as_completed(
    executor: Executor, jobs: Iterable[Job], started: Callable[[Job], None] | None = None
) -> Iterator[tuple[Job, TrialResult]]:
    """Each job with its result as it finishes: all at once on a :class:`ConcurrentExecutor`,
    else one at a time, calling ``started`` before each."""
    if isinstance(executor, ConcurrentExecutor):
        yield from executor.run_many(list(jobs))
        return
    for job in jobs:
        if started is not None:
            started(job)
        yield job, executor.run(job.trial, job.out_dir, job.timeout_s)


def _kill_own_group() -> None:
    """SIGKILL this worker's process group, or only this process if it leads none."""
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _watch_lifeline(lifeline: Connection) -> None:
    """Block until the parent's end of ``lifeline`` closes (the parent is gone), then die."""
    with contextlib.suppress(OSError, EOFError):
        lifeline.poll(None)
    _kill_own_group()


def _worker(
    trial: TrialSpec,
    out_dir: str,
    conn: Connection,
    context: WorkerContext,
    lifeline: Connection | None = None,
) -> None:
    with contextlib.suppress(OSError):  # a group of its own: terminal signals reach the parent
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides, and kills the group
    if lifeline is not None:
        threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()
    from qatbench.trial.lifecycle import run_trial

    context.apply()
    # Everything this fresh worker holds now came from the forkserver's imports (torch,
    # onnxruntime: some 300,000 objects). Frozen, they stay out of the collector's way, so
    # each gc.collect() of the trial (after a phase, before timing) scans only what the
    # trial allocates: 0.2-0.3 s less per call, a second or more per small trial.
    gc.freeze()

    result = run_trial(trial, Path(out_dir), report=lambda phase: conn.send(("phase", phase)))
    conn.send(("result", with_node_env(result, trial).to_dict()))
    conn.close()


def with_node_env(result: TrialResult, trial: TrialSpec) -> TrialResult:
    """``result`` with the fingerprint of the machine that ran it as ``details["env"]``
    (on a cluster that is not the machine that writes the report)."""
    from qatbench.measure.env import fingerprint

    env = fingerprint(threads=trial.measure.threads)
    env["cores"] = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    return replace(result, details={**result.details, "env": env})


class LocalProcessExecutor:
    """Runs trials one at a time, each in a fresh worker process.

    ``context`` is what workers take from their parent (see :class:`WorkerContext`); by
    default it is captured from this process at each trial, and the Ray executor passes
    the driver's instead.
    """

    def __init__(self, context: WorkerContext | None = None) -> None:
        self._current: Any = None
        self._context = context
        # Called with (trial id, phase) as the worker enters each lifecycle phase.
        self.on_phase: Callable[[str, str], None] | None = None

    def run(self, trial: TrialSpec, out_dir: Path, timeout_s: float) -> TrialResult:
        out_dir = Path(out_dir).absolute()
        out_dir.mkdir(parents=True, exist_ok=True)
        ctx = _context()
        parent, child = ctx.Pipe(duplex=False)
        # Only this process ever holds ``keep``: its end-of-file tells the worker we are gone.
        lifeline, keep = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_worker,
            args=(trial, str(out_dir), child, self._context or WorkerContext.capture(), lifeline),
            daemon=True,
        )
        self._current = process
        try:
            process.start()
        finally:
            child.close()
            lifeline.close()
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
                        if self.on_phase is not None:
                            self.on_phase(trial.id, phase)
                    else:
                        return TrialResult.from_dict(payload)
                elif not process.is_alive():
                    return _died(trial, phase, process)
        finally:
            self.stop()
            parent.close()
            keep.close()

    def stop(self) -> None:
        """Kill the running worker's process group, if any (timeouts, Ctrl-C), and reap it."""
        process, self._current = self._current, None
        if process is None or process.pid is None:
            return
        # The group outlives a worker that has already exited when it started children.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.is_alive():
            with contextlib.suppress(ProcessLookupError):
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
    return with_node_env(failed_result(trial, phase, reason), trial)


def failed_result(trial: TrialSpec, phase: str, reason: str) -> TrialResult:
    """A failed result of ``trial`` that never reported one (crash, timeout, lost node)."""
    return TrialResult(
        id=trial.id,
        model=trial.model.key,
        method=trial.method.name,
        bits=trial.bits,
        runtime=trial.runtime,
        status="failed",
        error=TrialFailure(phase, reason),
    )
