"""Run a sweep's trials as Ray tasks on a cluster (``qatbench run --executor ray``).

Each trial is one Ray task reserving ``num_cpus`` = the trial's ``measure.threads``, so
trials placed on the same node never share cores; with ``one_per_node`` it also takes the
node's single unit of the custom resource :data:`NODE_RESOURCE`, so a latency-critical
trial has its node to itself. Inside the task the trial runs exactly as it does locally,
in an isolated worker process of a :class:`~qatbench.sweep.executor.LocalProcessExecutor`, so a
crash or timeout is a failed result naming its phase. The task returns the result and the
bytes of the trial's files (model.onnx, model.pt, ...), which the driver writes under its
own trial folder: no storage needs to be shared between the nodes.

Results come back as they finish (:meth:`RayExecutor.run_many`); the runner logs and
reports each at once. Ray is an optional extra, imported only here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qatbench.errors import ConfigError
from qatbench.results import TrialResult
from qatbench.spec.schema import TrialSpec
from qatbench.sweep.executor import Job, LocalProcessExecutor, WorkerContext, failed_result

NODE_RESOURCE = "qatbench_node"  # one unit per node: `ray start --resources='{"qatbench_node": 1}'`
MAX_RETURN_BYTES = 256 * 1024 * 1024  # artifact bytes one task hands back; more stays behind
INSTALL_HINT = "pip install 'qatbench[ray]'"
CONNECT_TIMEOUT_S = 5.0
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


class RayExecutor:
    """Runs trials as Ray tasks, several at once; see the module doc.

    ``address`` is a Ray cluster's address (default: ``RAY_ADDRESS``, else a local Ray
    instance is started, and shut down by :meth:`close`). An already initialised Ray (a
    test, a notebook) is used as it is.
    """

    def __init__(self, address: str | None = None, *, one_per_node: bool = False) -> None:
        self._ray = import_ray()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address:
            _check_reachable(self.address)  # before the sweep starts, not at its first trial
        self.one_per_node = one_per_node
        self._started_ray = False
        self._pending: dict[Any, Job] = {}
        self._remote: Any = None

    def run(self, trial: TrialSpec, out_dir: Path, timeout_s: float) -> TrialResult:
        """Run one trial on the cluster and wait for it."""
        for _job, result in self.run_many([Job(trial, out_dir, timeout_s)]):
            return result
        raise AssertionError("run_many returned no result")  # pragma: no cover

    def run_many(self, jobs: list[Job]) -> Iterator[tuple[Job, TrialResult]]:
        """Submit every job as a task, then yield each with its result as it finishes."""
        if not jobs:
            return
        ray = self._connect(jobs)
        context = WorkerContext.capture()
        for job in jobs:
            options: dict[str, Any] = {
                "num_cpus": job.trial.measure.threads,
                "name": f"qatbench:{job.trial.id}",
                "max_retries": 1,  # a lost node or worker, never a failing trial (a result)
            }
            if self.one_per_node:
                options["resources"] = {NODE_RESOURCE: 1}
            ref = self._remote.options(**options).remote(job.trial, job.timeout_s, context)
            self._pending[ref] = job
        while self._pending:
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=_WAIT_S)
            for ref in ready:
                job = self._pending.pop(ref)
                yield job, self._land(job, ref)

    def stop(self) -> None:
        """Cancel every task still queued or running (their trial workers die with them)."""
        pending, self._pending = self._pending, {}
        for ref in pending:
            with contextlib.suppress(Exception):  # already finished or its node is gone
                self._ray.cancel(ref, force=True)

    def close(self) -> None:
        """Stop, and shut down the Ray instance this executor started, if it did."""
        self.stop()
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False

    def _connect(self, jobs: list[Job]) -> Any:
        ray = self._ray
        if not ray.is_initialized():
            where = self.address or "a local Ray instance"
            try:
                ray.init(
                    address=self.address,
                    include_dashboard=False,
                    logging_level="WARNING",
                    # a local instance of our own listens on loopback only
                    **({} if self.address else {"_node_ip_address": "127.0.0.1"}),
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(
                    f"--ray-address {where}: cannot connect: {_one_line(exc)}"
                ) from None
            self._started_ray = self.address is None
        if self._remote is None:
            self._remote = ray.remote(_ray_task)
        self._check_capacity(jobs)
        return ray

    def _check_capacity(self, jobs: list[Job]) -> None:
        """Refuse trials no node can ever take, which Ray would queue forever."""
        nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        if self.one_per_node and not any(r.get(NODE_RESOURCE) for r in nodes):
            raise ConfigError(
                f"--ray-one-per-node: no node of the Ray cluster offers the resource "
                f"{NODE_RESOURCE!r}; start each node with: ray start ... "
                f"--resources='{{\"{NODE_RESOURCE}\": 1}}'"
            )
        most = max((r.get("CPU", 0) for r in nodes), default=0)
        threads = max(j.trial.measure.threads for j in jobs)
        if threads > most:
            raise ConfigError(
                f"measure.threads {threads}: no node of the Ray cluster has that many CPUs "
                f"(the largest has {most:g})"
            )

    def _land(self, job: Job, ref: Any) -> TrialResult:
        """The task's result, its files written under ``job.out_dir`` and named there."""
        try:
            payload = self._ray.get(ref)
        except Exception as exc:  # a lost node, a killed Ray worker, a cancelled task
            return failed_result(job.trial, "start", f"Ray task failed: {_one_line(exc)}")
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
        return _replaced(result, artifacts=artifacts)


def _check_reachable(address: str) -> None:
    """Fail in seconds on a ``host:port`` where no Ray head listens (``ray.init`` would wait
    for minutes); other forms (``auto``, ``ray://``) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"--ray-address {address}: no Ray head answers there ({_one_line(exc)}); "
            "start one with: ray start --head"
        ) from None


def _ray_task(trial: TrialSpec, timeout_s: float, context: WorkerContext) -> dict[str, Any]:
    """Body of the Ray task: run ``trial`` in an isolated worker on this node and return
    its result with the bytes of the files it wrote (relative path -> bytes)."""
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


def _one_line(error: object) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
