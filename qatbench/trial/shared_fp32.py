"""What every trial of a model works out from the same fp32 model, worked out once a sweep.

Each trial needs its fp32 model, its outputs on the evaluation data (the reference of
every error and quality figure), and a graph trial the size of fp32's exported graph (the
denominator of its compression ratio: an export of the whole model, whose constant folding
copies every weight for a moment). A sweep of several methods and runtimes would build
the model and work both out once per trial, the same work on the same model.

The first trial of a model entry and seed saves its build (:func:`built_model`: a pickle
of the model and example inputs, and torch's random state after the build); the others
load it memory-mapped instead of calling the factory (a 1.1B Llama from its config: 15 to
20 s of random initialisation).

So the sweep names a folder for its workers (``QATBENCH_SHARED_DIR``, set by
:func:`shared_folder` around the sweep's trials; the folder goes when the sweep ends),
and the first trial that needs a fact stores it there, under a key of everything the fact
depends on: the model's entry, data and seed, the threads, qatbench's and torch's versions,
and a fingerprint of the built model's weights, so a factory that does not build the same
weights twice never reads another build's outputs. Later trials read it instead of
computing it. A trial run alone (the pytest plugin, ``qatbench trial``) computes everything
itself. Files are written atomically, so trials running at once at worst compute twice.

A method whose capabilities promise ``reusable_model`` is converted and exported once a
sweep too. The first trial of a model, method, options and bits saves its converted model
(a pickle with its tensors, loaded memory-mapped, from the sweep's own folder), and that
method's trials on the other runtimes load it instead of calibrating and converting again:
a GPTQ of a 1B model is half an hour of calibration, the same for torch and for
onnxruntime. A model that does not pickle or load is converted by each trial, as before.
Likewise the first trial that exports the graph (onnxruntime, OpenVINO, a torch trial that
keeps the graph) hard-links it (and its data file) into the folder, and the others link
it into their own folders instead of exporting, checking and tagging it again. Only what
another trial of the sweep will read is saved (``reused.json``, written by
:func:`shared_folder` from the sweep's trials).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.metadata
import json
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from qatbench import registry
from qatbench.results import write_text_atomic
from qatbench.runtimes.base import ONNX_GRAPH
from qatbench.runtimes.onnx_weights import data_path
from qatbench.spec.schema import ONNX_ARTIFACT, TrialSpec

SHARED_ENV = "QATBENCH_SHARED_DIR"
KEY_ENV = "QATBENCH_SHARED_KEY"  # signs the pickled models (_load_model), never on disk
SIGNATURE_SUFFIX = ".hmac"
REFERENCE_FILE = "reference_outputs.pt"
GRAPH_FILE = "fp32_graph.json"
CONVERTED_PREFIX = "converted-"
EXPORTED_PREFIX = "exported-"
REUSED_FILE = "reused.json"  # per kind, the ids of trials whose work another will read
CONVERTED, EXPORTED, BUILT = "converted", "exported", "built"
BUILT_PREFIX = "built-"


@dataclass
class Conversion:
    """A method's converted model with what the trial records of it: the method's
    ``choices()`` and the id of the trial that converted it."""

    model: torch.nn.Module
    choices: dict[str, Any]
    by: str


@contextlib.contextmanager
def shared_folder(folder: Path, trials: Sequence[TrialSpec] = ()) -> Iterator[None]:
    """Name ``folder`` as the shared folder of the trials started inside, then remove it.
    ``trials`` are the sweep's trials to run: those whose build, conversion or export
    another of them will read are listed in the folder, and only those save it."""
    try:
        exporting = [t for t in trials if exports_graph(t)]
        reused = {
            BUILT: _shared_keys(trials, TrialSpec.build_key),
            CONVERTED: _shared_keys(trials, TrialSpec.conversion_key),
            EXPORTED: _shared_keys(exporting, TrialSpec.conversion_key),
        }
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / REUSED_FILE, json.dumps(reused))
        names = {SHARED_ENV: str(folder.absolute()), KEY_ENV: secrets.token_hex(32)}
        with mock.patch.dict(os.environ, names):
            yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def exports_graph(trial: TrialSpec) -> bool:
    """Whether ``trial`` exports its converted model: its runtime runs graphs, or the
    experiment keeps the graph of a torch trial."""
    runs_graph = registry.runtimes.get(trial.runtime).capabilities.artifact == ONNX_GRAPH
    return runs_graph or ONNX_ARTIFACT in trial.artifacts


def _shared_keys(trials: Sequence[TrialSpec], key: Callable[[TrialSpec], str]) -> list[str]:
    """The ids of ``trials`` whose ``key`` another of them has."""
    keys = {t.id: key(t) for t in trials}
    counts = Counter(keys.values())
    return [trial_id for trial_id, key in keys.items() if counts[key] > 1]


Built = tuple[torch.nn.Module, tuple[torch.Tensor, ...]]


def built_model(
    trial: TrialSpec, build: Callable[[], Built]
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], bool]:
    """``trial``'s fp32 model and example inputs as ``build()`` makes them, and whether
    they were read from the sweep: loaded (memory-mapped) if a trial of the sweep with
    the same model entry and seed saved its build, else built, and saved (with torch's
    random state after the build, restored on loading, so what follows draws the same
    numbers) where another trial of the sweep will load it. A model that does not pickle
    or load is built by each trial."""
    root = os.environ.get(SHARED_ENV)
    if not root:
        return (*build(), False)
    key = f"{trial.build_key()}{importlib.metadata.version('qatbench')}{torch.__version__}"
    path = Path(root) / f"{BUILT_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    saved = _load_model(path)
    if saved is not None:
        torch.set_rng_state(saved["rng"])
        return saved["model"], tuple(saved["example"]), True
    model, example = build()
    if trial.id in _reused(Path(root), BUILT):
        _save_model(path, {"model": model, "example": example, "rng": torch.get_rng_state()})
    return model, example, False


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

    def converted(self, trial: TrialSpec, compute: Callable[[], Conversion]) -> Conversion:
        """``trial``'s converted model: loaded (memory-mapped) if a trial of the sweep on
        another runtime saved it, else computed, and saved where the sweep has such a
        trial still to run. A model that cannot be saved is returned as computed; one that
        cannot be loaded is computed again."""
        if self.folder is None:
            return compute()
        digest = hashlib.sha256(trial.conversion_key().encode()).hexdigest()[:20]
        path = self.folder / f"{CONVERTED_PREFIX}{digest}.pt"
        saved = _load_model(path)
        if saved is not None:
            self.read.append("converted_model")
            return Conversion(saved["model"], saved["choices"], saved["by"])
        made = compute()
        if trial.id in _reused(self.folder.parent, CONVERTED):
            _save_model(path, {"model": made.model, "choices": made.choices, "by": made.by})
        return made

    def exported(self, trial: TrialSpec, graph: Path, export: Callable[[], None]) -> str:
        """Put ``trial``'s graph at ``graph`` (with its data file, if any): hard links to
        the graph that a trial of the sweep exported from the same conversion, else
        ``export()``, then linked into the shared folder where another trial will link
        it. Returns the id of the trial that exported it."""
        if self.folder is None:
            export()
            return trial.id
        digest = hashlib.sha256(trial.conversion_key().encode()).hexdigest()[:20]
        stored = self.folder / f"{EXPORTED_PREFIX}{digest}"
        if (stored / graph.name).exists():
            try:
                _link_graph(stored / graph.name, graph)
                self.read.append("exported_graph")
                return (stored / "by").read_text()
            except OSError:  # a folder on another device that cannot copy either
                for path in (graph, data_path(graph)):
                    path.unlink(missing_ok=True)
        export()
        if trial.id in _reused(self.folder.parent, EXPORTED):
            staged = stored.with_name(f"{stored.name}.{os.getpid()}.tmp")
            try:
                staged.mkdir(parents=True)
                _link_graph(graph, staged / graph.name)
                (staged / "by").write_text(trial.id)
                os.replace(staged, stored)  # whole or not at all
            except OSError:  # another trial stored it first, or links fail: not shared
                shutil.rmtree(staged, ignore_errors=True)
        return trial.id


def _load_model(path: Path) -> dict[str, Any] | None:
    """What :func:`_save_model` saved at ``path``, its tensors memory-mapped; None where
    there is none, it does not load (a class that no longer imports: the trial then works
    it out as if it were the first), or its signature does not match.

    These are the only files qatbench unpickles whole (``weights_only=False``: a model's
    classes, not only tensors; every checkpoint a user brings is read with
    ``weights_only=True``). They are written by the sweep's own workers and signed with
    HMAC-SHA256 under a key that exists only in the sweep's environment
    (``QATBENCH_SHARED_KEY``, never on disk): a file anyone else put or changed in the
    folder fails the check and is not unpickled. The file checked is the file loaded: it
    is opened once, checked through that descriptor and loaded from it."""
    key = os.environ.get(KEY_ENV)
    signature = path.with_name(path.name + SIGNATURE_SUFFIX)
    if not key or not path.exists() or not signature.exists():
        return None
    with open(path, "rb") as file:
        mac = hmac.new(bytes.fromhex(key), digestmod=hashlib.sha256)
        while chunk := file.read(1 << 20):
            mac.update(chunk)
        if not hmac.compare_digest(mac.hexdigest(), signature.read_text().strip()):
            return None
        try:  # the checked file, by its descriptor: a later rename cannot swap it
            saved = torch.load(f"/dev/fd/{file.fileno()}", mmap=True, weights_only=False)
        except Exception:
            return None
    if isinstance(saved, dict) and isinstance(saved.get("model"), torch.nn.Module):
        return saved
    return None


def _save_model(path: Path, saved: dict[str, Any]) -> None:
    """Pickle ``saved`` (a model and what goes with it) to ``path`` atomically, with its
    signature beside it (see :func:`_load_model`); a model that does not pickle is not
    saved, and each trial makes its own."""
    key = os.environ.get(KEY_ENV)
    if not key:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(saved, staged)
        mac = hmac.new(bytes.fromhex(key), digestmod=hashlib.sha256)
        with open(staged, "rb") as file:
            while chunk := file.read(1 << 20):
                mac.update(chunk)
        write_text_atomic(path.with_name(path.name + SIGNATURE_SUFFIX), mac.hexdigest())
        os.replace(staged, path)
    except Exception:
        staged.unlink(missing_ok=True)


def _link_graph(source: Path, target: Path) -> None:
    """``target`` (and its data file) as hard links to ``source``'s, copies where the
    two folders are on different devices."""
    for src, dst in ((source, target), (data_path(source), data_path(target))):
        if not src.exists():
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def _reused(root: Path, kind: str) -> set[str]:
    try:
        return set(json.loads((root / REUSED_FILE).read_text())[kind])
    except (OSError, ValueError, KeyError, TypeError):
        return set()
