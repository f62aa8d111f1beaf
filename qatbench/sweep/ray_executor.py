"""Run a sweep's trials as Ray tasks on a cluster (``qatbench run --executor ray``).

Where a trial runs is the driver's choice, not Ray's. Each alive node gets ``per_node``
slots (1 by default: at most one timing pass per node at a time), each owning a disjoint
range of the node's cores. A job goes to a free slot as a task pinned to that node (hard
node affinity) that reserves ``measure.threads`` CPUs; inside it, the trial runs exactly as
it does locally, in an isolated worker of a
:class:`~qatbench.sweep.executor.LocalProcessExecutor` whose process is pinned
(``sched_setaffinity``) to the first ``measure.threads`` cores of the slot, so a crash or
timeout is a failed result naming its phase. ``details.env`` of every result names the
node (``node_id``, ``hostname``) and the ``cores`` the trial ran on.

A task lost with its Ray worker or node (killed, out of memory, the machine gone) is run
again on a free slot, ``retries`` times (1 by default); the result says how often
(``details.retries``) and why (``details.lost``). A trial lost more often fails with the
cause as its phase (``node lost``, ``worker killed``). The task returns the result and
the bytes of the trial's files (model.onnx, ...), which the driver writes under its own
trial folder: no storage needs to be shared between the nodes.

Results come back as they finish (:meth:`RayExecutor.run_many`); the runner logs and
reports each at once. Ray is an optional extra, imported only here and in
:mod:`qatbench.sweep.ray_instance` (which starts or connects to the instance).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatbench.errors import ConfigError
from qatbench.results import TrialResult
from qatbench.spec.schema import TrialSpec
from qatbench.sweep import ray_instance
from qatbench.sweep.executor import Job, LocalProcessExecutor, WorkerContext, failed_result
from qatbench.sweep.ray_instance import CONNECT_TIMEOUT_S, Instance, one_line

MAX_RETURN_BYTES = 256 * 1024 * 1024  # artifact bytes one task hands back; more stays behind
INSTALL_HINT = "pip install 'qatbench[ray]'"
LOST_TASK_RETRIES = 1  # a lost worker or node, never a failing trial (that is a result)
NODE_LOST, WORKER_KILLED, TASK_ERROR = "node lost", "worker killed", "ray task"
_WAIT_S = 0.5  # ray.wait in slices, so Ctrl-C and SIGTERM are handled promptly


def import_ray() -> Any:
    """The ``ray`` module, or a one-line :class:`ConfigError` telling how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"--executor ray: Ray is not installed; install the extra: {INSTALL_HINT}"
        ) from None
    return ray


@dataclass(frozen=True)
class Slot:
    """Place ``index`` of a node: cores ``[index * width, (index + 1) * width)`` of it."""

    node_id: str
    host: str
    index: int
    width: int


@dataclass
class _Attempt:
    """A job on its way through the cluster: where it runs now and what it lost so far."""

    job: Job
    slot: Slot | None = None
    lost: list[str] = field(default_factory=list)


class _Lost(Exception):
    """A task that ended without a result: its cause (NODE_LOST, ...) and Ray's words."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause, self.detail = cause, detail


class RayExecutor:
    """Runs trials as Ray tasks, several at once, placed by node; see the module doc.

    ``address`` is a Ray cluster's address (default: ``RAY_ADDRESS``); without one a
    fresh local instance is started on 127.0.0.1 (see :mod:`qatbench.sweep.ray_instance`)
    and shut down by :meth:`close`. Connecting gives up after ``connect_timeout_s``. An
    already initialised Ray (a test, a notebook) is used as it is and left running.
    ``per_node`` is how many trials a node runs at once, each on cores of its own.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        per_node: int = 1,
        retries: int = LOST_TASK_RETRIES,
        num_cpus: int | None = None,
    ) -> None:
        if per_node < 1:
            raise ConfigError(f"--ray-trials-per-node {per_node}: must be at least 1")
        if connect_timeout_s <= 0:
            raise ConfigError(f"--ray-connect-timeout {connect_timeout_s:g}: must be positive")
        self._ray = import_ray()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.connect_timeout_s = connect_timeout_s
        self.per_node = per_node
        self.retries = retries
        self.num_cpus = num_cpus
        self.instance: Instance | None = None
        self._running: dict[Any, _Attempt] = {}
        self._remote: Any = None

    def connect(self) -> Instance:
        """Start or reach the Ray instance (once); a one-line ConfigError when that fails."""
        if self.instance is None:
            ray = self._ray
            if ray.is_initialized():
                self.instance = ray_instance.attached(ray)
            elif self.address:
                self.instance = ray_instance.connect(ray, self.address, self.connect_timeout_s)
            else:
                self.instance = ray_instance.start_local(ray, num_cpus=self.num_cpus)
            self._remote = ray.remote(_ray_task)
        return self.instance

    def run(self, trial: TrialSpec, out_dir: Path, timeout_s: float) -> TrialResult:
        """Run one trial on the cluster and wait for it."""
        for _job, result in self.run_many([Job(trial, out_dir, timeout_s)]):
            return result
        raise AssertionError("run_many returned no result")  # pragma: no cover

    def run_many(self, jobs: list[Job]) -> Iterator[tuple[Job, TrialResult]]:
        """Place every job on a free slot as one frees up; yield each with its result as it
        finishes, after its retries (see the module doc)."""
        if not jobs:
            return
        self.connect()
        known: dict[str, list[Slot]] = {}
        free = self._refresh(known, [])
        self._check_capacity(jobs, known)
        context = WorkerContext.capture()
        queue: deque[_Attempt] = deque(_Attempt(job) for job in jobs)
        while queue or self._running:
            queue = self._place(queue, free, context)
            if queue and not self._running:
                free = self._refresh(known, free)
                if not any(_fits(a.job, s) for a in queue for s in free):
                    for attempt in queue:
                        yield (
                            attempt.job,
                            _lost_result(
                                attempt, NODE_LOST, "no alive node of the Ray cluster can take it"
                            ),
                        )
                    queue.clear()
                continue
            ready, _ = self._ray.wait(list(self._running), num_returns=1, timeout=_WAIT_S)
            for ref in ready:
                attempt = self._running.pop(ref)
                slot = attempt.slot
                assert slot is not None
                try:
                    result = self._land(attempt, ref)
                except _Lost as lost:
                    free = self._refresh(known, free)
                    cause = NODE_LOST if slot.node_id not in known else lost.cause
                    if slot.node_id in known:
                        free.append(slot)
                    attempt.lost.append(
                        f"{cause} on {slot.host} (node {slot.node_id}): {lost.detail}"
                    )
                    if len(attempt.lost) <= self.retries:
                        queue.appendleft(attempt)  # first in line for the next free slot
                        continue
                    yield attempt.job, _lost_result(attempt, cause, lost.detail)
                    continue
                free.append(slot)
                if queue:
                    free = self._refresh(known, free)  # nodes that joined meanwhile
                yield attempt.job, result

    def stop(self) -> None:
        """Cancel every task still queued or running (their trial workers die with them)."""
        running, self._running = self._running, {}
        for ref in running:
            with contextlib.suppress(Exception):  # already finished or its node is gone
                self._ray.cancel(ref, force=True)

    def close(self) -> None:
        """Stop, and shut down the Ray instance this executor started, if it did."""
        self.stop()
        if self.instance is not None and self.instance.started:
            self.instance.close()
        self.instance = None
        self._remote = None

    def _place(
        self, queue: deque[_Attempt], free: list[Slot], context: WorkerContext
    ) -> deque[_Attempt]:
        """Submit what fits on the free slots, first come first served; the rest waits."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        waiting: deque[_Attempt] = deque()
        for attempt in queue:
            slot = next((s for s in free if _fits(attempt.job, s)), None)
            if slot is None:
                waiting.append(attempt)
                continue
            free.remove(slot)
            attempt.slot = slot
            job = attempt.job
            ref = self._remote.options(
                num_cpus=job.trial.measure.threads,
                name=f"qatbench:{job.trial.id}",
                max_retries=0,  # retried here, where the count is kept
                retry_exceptions=False,
                scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=False),
            ).remote(job.trial, job.timeout_s, context, slot.index, slot.width)
            self._running[ref] = attempt
        return waiting

    def _refresh(self, known: dict[str, list[Slot]], free: list[Slot]) -> list[Slot]:
        """Update ``known`` (alive node -> its slots) from the cluster: slots of new nodes
        become free, those of dead nodes are dropped. Returns the free slots, spread so
        that consecutive jobs go to different nodes."""
        alive = {}
        for node in self._ray.nodes():
            cpus = int(node.get("Resources", {}).get("CPU", 0))
            if node.get("Alive") and cpus >= 1:
                alive[node["NodeID"]] = (node.get("NodeManagerHostname") or "?", cpus)
        for node_id in list(known):
            if node_id not in alive:
                del known[node_id]
        kept = [s for s in free if s.node_id in known]
        for node_id, (host, cpus) in alive.items():
            if node_id not in known:
                count = min(self.per_node, cpus)
                known[node_id] = [Slot(node_id, host, i, cpus // count) for i in range(count)]
                kept.extend(known[node_id])
        return sorted(kept, key=lambda s: s.index)

    def _check_capacity(self, jobs: list[Job], known: dict[str, list[Slot]]) -> None:
        """Refuse trials no slot can ever take, which would wait forever."""
        widest = max((s.width for slots in known.values() for s in slots), default=0)
        threads = max(j.trial.measure.threads for j in jobs)
        if threads > widest:
            per = f" with {self.per_node} trials per node" if self.per_node > 1 else ""
            raise ConfigError(
                f"measure.threads {threads}: no node of the Ray cluster has that many CPUs"
                f"{per} (the largest slot has {widest:g})"
            )

    def _land(self, attempt: _Attempt, ref: Any) -> TrialResult:
        """The task's result, its files written under the job's folder and named there;
        :class:`_Lost` when the task ended without one."""
        ray, job = self._ray, attempt.job
        try:
            payload = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the task's own code raised (disk full, ...)
            return _lost_result(attempt, TASK_ERROR, one_line(exc))
        except (ray.exceptions.NodeDiedError, ray.exceptions.TaskUnschedulableError) as exc:
            raise _Lost(NODE_LOST, one_line(exc)) from None
        except ray.exceptions.RayError as exc:  # a killed worker, a lost object, ...
            raise _Lost(WORKER_KILLED, one_line(exc)) from None
        out_dir = Path(job.out_dir).absolute()
        out_dir.mkdir(parents=True, exist_ok=True)
        for rel, data in payload["files"].items():
            path = (out_dir / rel).resolve()
            if not path.is_relative_to(out_dir.resolve()):
                continue  # never written outside the trial folder
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        result = TrialResult.from_dict(payload["result"])
        artifacts = {name: str(out_dir / rel) for name, rel in result.artifacts.items()}
        details = {**result.details, **_retry_details(attempt, len(attempt.lost))}
        return _replaced(result, artifacts=artifacts, details=details)


def _fits(job: Job, slot: Slot) -> bool:
    return job.trial.measure.threads <= slot.width


def _retry_details(attempt: _Attempt, retries: int) -> dict[str, Any]:
    """How often the job was run again (``retries``) and why each attempt was lost."""
    return {"retries": retries, **({"lost": list(attempt.lost)} if attempt.lost else {})}


def _lost_result(attempt: _Attempt, cause: str, detail: str) -> TrialResult:
    """The failed result of a job the cluster lost (or could not place) for good."""
    slot = attempt.slot
    retries = max(len(attempt.lost) - 1, 0)  # the last loss was not run again
    retried = f" (after {retries} retries)" if retries else ""
    where = f" on {slot.host}" if slot else ""
    result = failed_result(attempt.job.trial, cause, f"{cause}{where}{retried}: {detail}")
    env = {"hostname": slot.host, "node_id": slot.node_id} if slot else {}
    return _replaced(result, details={"env": env, **_retry_details(attempt, retries)})


def _slot_cores(index: int, width: int, threads: int) -> list[int]:
    """The cores of slot ``index`` a trial of ``threads`` threads is pinned to: the first
    ``threads`` of the slot's range of this process's allowed cores (none if the node
    claims more CPUs than it has)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[index * width : (index + 1) * width][:threads]


def _ray_task(
    trial: TrialSpec, timeout_s: float, context: WorkerContext, slot: int, width: int
) -> dict[str, Any]:
    """Body of the Ray task: run ``trial`` in an isolated worker pinned to its slot's cores
    on this node, and return its result with the bytes of the files it wrote (relative
    path -> bytes)."""
    import ray

    cores = _slot_cores(slot, width, trial.measure.threads)
    context = dataclasses.replace(context, cores=tuple(cores))
    with tempfile.TemporaryDirectory(prefix="qatbench-ray-") as tmp:
        out_dir = Path(tmp) / trial.id
        result = LocalProcessExecutor(context).run(trial, out_dir, timeout_s)
        files, left = _read_files(out_dir)
        # artifacts named relative to the trial folder; those not returned are dropped
        artifacts: dict[str, str] = {}
        for name, path in result.artifacts.items():
            rel = Path(path).relative_to(out_dir).as_posix() if _inside(path, out_dir) else ""
            if rel in files:
                artifacts[name] = rel
        details = dict(result.details)
        details["env"] = {
            **details.get("env", {}),
            "hostname": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "cores": ",".join(map(str, cores)) or "any",
        }
        if left:
            details["warnings"] = [
                *details.get("warnings", []),
                f"artifacts over {MAX_RETURN_BYTES} bytes not returned from node "
                f"{socket.gethostname()}: {', '.join(left)}",
            ]
        result = _replaced(result, artifacts=artifacts, details=details)
        return {"result": result.to_dict(), "files": files}


def _inside(path: str, folder: Path) -> bool:
    return Path(path).absolute().is_relative_to(folder.absolute())


def _replaced(result: TrialResult, **changes: Any) -> TrialResult:
    return dataclasses.replace(result, **changes)


def _read_files(out_dir: Path) -> tuple[dict[str, bytes], list[str]]:
    """Every file under ``out_dir`` (smallest first) up to MAX_RETURN_BYTES in all, and the
    relative paths of those left out."""
    found = sorted(
        (p for p in out_dir.rglob("*") if p.is_file() and not p.is_symlink()),
        key=lambda p: p.stat().st_size,
    )
    files: dict[str, bytes] = {}
    left: list[str] = []
    total = 0
    for path in found:
        rel = path.relative_to(out_dir).as_posix()
        size = path.stat().st_size
        if total + size > MAX_RETURN_BYTES:
            left.append(rel)
            continue
        files[rel] = path.read_bytes()
        total += size
    return files, left
