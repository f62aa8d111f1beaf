"""What every trial of a model works out from the same fp32 model, worked out once a sweep.

Each trial builds its fp32 model, then computes its outputs on the evaluation data (the
reference of every error and quality figure), and a graph trial the size of fp32's
exported graph (the denominator of its compression ratio: an export of the whole model,
whose constant folding copies every weight for a moment). A sweep of several methods
and runtimes would do both once per trial, the same work on the same model.

So the sweep names a folder for its workers (``QATBENCH_SHARED_DIR``, set by
:func:`shared_folder` around the sweep's trials; the folder goes when the sweep ends),
and the first trial that needs a fact stores it there, under a key of everything the fact
depends on: the model's entry, data and seed, the threads, qatbench's and torch's versions,
and a fingerprint of the built model's weights, so a factory that does not build the same
weights twice never reads another build's outputs. Later trials read it instead of
computing it. A trial run alone (the pytest plugin, ``qatbench trial``) computes everything
itself. Files are written atomically, so trials running at once at worst compute twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from qatbench.results import write_text_atomic
from qatbench.spec.schema import TrialSpec

SHARED_ENV = "QATBENCH_SHARED_DIR"
REFERENCE_FILE = "reference_outputs.pt"
GRAPH_FILE = "fp32_graph.json"


@contextlib.contextmanager
def shared_folder(folder: Path) -> Iterator[None]:
    """Name ``folder`` as the shared folder of the trials started inside, then remove it."""
    try:
        with mock.patch.dict(os.environ, {SHARED_ENV: str(folder.absolute())}):
            yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fingerprint(model: torch.nn.Module) -> list[object]:
    """Names, shapes, dtypes and float64 sums of the model's parameters and buffers: equal
    for two builds of the same weights, and different for any two random initialisations
    or checkpoints in practice. It reads each tensor once, copying none."""
    found: list[object] = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        t = tensor.detach()
        total = None if t.is_complex() else _sum64(t)
        found.append([name, list(t.shape), str(t.dtype), total])
    return found


def _sum64(t: torch.Tensor) -> float:
    """The float64 sum of ``t``, a chunk at a time: ``torch.sum(t, dtype=torch.float64)``
    converts the whole tensor first (a 0.5 GiB copy of a 32000 x 2048 embedding)."""
    flat = t.reshape(-1)
    return sum(float(torch.sum(chunk, dtype=torch.float64)) for chunk in flat.split(1 << 16))


@dataclass
class SharedFp32:
    """The shared facts of one trial's fp32 model; ``folder`` None: nothing is shared.
    ``read`` names the facts this trial read instead of computing them."""

    folder: Path | None
    read: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, trial: TrialSpec, fp32: torch.nn.Module) -> SharedFp32:
        root = os.environ.get(SHARED_ENV)
        if not root:
            return cls(None)
        identity = {
            "model": trial.model.model_dump(exclude={"expect"}),
            "data": trial.data.model_dump(),
            "seed": trial.seed,
            "threads": trial.measure.threads,
            "qatbench": importlib.metadata.version("qatbench"),
            "torch": torch.__version__,
            "architecture": str(fp32),
            "weights": fingerprint(fp32),
        }
        text = json.dumps(identity, sort_keys=True, default=str)
        return cls(Path(root) / hashlib.sha256(text.encode()).hexdigest()[:20])

    def reference_outputs(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """fp32's outputs on the evaluation data: read (memory-mapped) if a trial stored
        them, else computed and stored."""
        if self.folder is None:
            return compute()
        path = self.folder / REFERENCE_FILE
        if path.exists():
            self.read.append("reference_outputs")
            return torch.load(path, mmap=True, weights_only=True)  # type: ignore[no-any-return]
        outputs = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(outputs, tmp)
        os.replace(tmp, path)
        return outputs

    def graph_bytes(self, compute: Callable[[], int]) -> int:
        """The bytes of fp32's exported graph: read if a trial stored them, else computed
        and stored."""
        if self.folder is not None and (self.folder / GRAPH_FILE).exists():
            self.read.append("graph_bytes")
            return int(json.loads((self.folder / GRAPH_FILE).read_text())["graph_bytes"])
        size = compute()
        self.record_graph_bytes(size)
        return size

    def record_graph_bytes(self, size: int) -> None:
        """Store the bytes of fp32's graph (fp32's own trial exported it)."""
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.folder / GRAPH_FILE, json.dumps({"graph_bytes": size}))
