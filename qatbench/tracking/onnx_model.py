"""A trial's ONNX graph logged to its run as an MLflow ONNX-flavour model, with a signature.

The logged model is named by the trial id (``runs:/<run id>/<trial id>``, characters MLflow
refuses in model names, such as the ``.`` of a variant's label, written ``_``; the run's page
in the MLflow UI lists it under "Logged models", the experiment's "Models" tab lists them all)
and carries the tag ``qatbench.trial_id``. Below :data:`EMBED_LIMIT_BYTES` the weights are
inside ``model.onnx``, so that the one file downloaded from the UI loads with ``onnx.load``.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow import MlflowClient

from qatbench.tracking.store import no_progress_bars

TRIAL_TAG = "qatbench.trial_id"  # = qatbench.tracking.tracker.TRIAL_TAG
# A protobuf message holds at most 2 GiB: larger graphs keep their weights beside model.onnx
# (download the model's folder whole, or use mlflow.onnx.load_model).
EMBED_LIMIT_BYTES = 2 * 1024**3 - 64 * 1024**2
# Graphs above this are logged without the sweep's process loading their weights.
LEAN_LOG_BYTES = 256 * 1024**2


def model_name(trial_id: str) -> str:
    """The trial id as an MLflow model name (no ``/ : . % " '``)."""
    return re.sub(r"[/:.%\"']", "_", trial_id)


def log_onnx_model(
    client: MlflowClient,
    uri: str,
    experiment_id: str,
    run_id: str,
    path: Path,
    example: str | None = None,
    trial_id: str = "onnx_model",
) -> None:
    """Log the ONNX graph at ``path`` with MLflow's ONNX flavour as the model ``trial_id``
    of the run: loadable with ``mlflow.onnx.load_model`` or ``mlflow.pyfunc.load_model``
    (``runs:/<run id>/<trial id>``), with a signature read from the graph (a dynamic
    dimension is -1) and, when the worker saved one (``example``, a ``.npy`` file), an
    input example. The logged model's ``model.onnx`` is then a hard link to the sweep
    folder's file where the two are identical on one file system (:func:`share_storage`):
    the graph is on disk once. Above :data:`LEAN_LOG_BYTES` the graph is logged from its
    structure (weights never loaded here, no input example) and its file linked in; its
    external data, where the graph has some (over 2 GiB of weights), is copied: onnx's
    loader refuses an external-data file with two links. A remote store gets MLflow's own
    copy (weights inside below :data:`EMBED_LIMIT_BYTES`)."""
    import mlflow.onnx  # heavy: only runs that have a graph pay for it
    import numpy as np
    import onnx
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    data = path.with_name(path.name + ".data")  # its external data, if any
    # The logged model is created here, in the tracker's experiment (log_model alone
    # would put it in the fluent API's active experiment); log_model, which works on
    # the fluent client, is pointed at this store for the call only. Explicit
    # requirements skip MLflow's dependency inference (a subprocess).
    logged = client.create_logged_model(
        experiment_id, name=model_name(trial_id), source_run_id=run_id, tags={TRIAL_TAG: trial_id}
    )
    local = _local_dir(logged.artifact_location)
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    # A large graph logged to a local store is logged as its structure, and the files
    # are then put in place: the sweep's process never holds the weights. MLflow checks
    # an input example by loading and running the model, so it is logged without one
    # (the trial ran the graph on onnxruntime already).
    lean = local is not None and size > LEAN_LOG_BYTES
    if lean:
        from qatbench.runtimes.onnx_weights import load_structure

        model = load_structure(path)
        input_example = None
    else:
        model = onnx.load(str(path))
        shown = example if example and Path(example).is_file() else None
        input_example = np.load(shown) if shown else None
    with _use_tracking_uri(uri), no_progress_bars():
        mlflow.onnx.log_model(
            model,
            name=model_name(trial_id),
            input_example=input_example,
            signature=onnx_signature(model),
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            onnx_execution_providers=["CPUExecutionProvider"],  # what qatbench measured
            model_id=logged.model_id,
            run_id=run_id,
            save_as_external_data=not lean and not _embeddable(model),
        )
    del model  # the graph's weights: not held while the copies are compared
    if not lean:
        share_storage(path, local)
        return
    assert local is not None
    link_or_copy(path, local / "model.onnx")  # the graph whole: its structure was logged
    if data.exists():  # onnx refuses external data with two links: this one is copied
        shutil.copyfile(data, local / data.name)


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes a hard link to ``source``, or a copy where links cannot be made
    (another file system); replaced atomically."""
    staged = target.with_name(target.name + ".link")
    staged.unlink(missing_ok=True)
    try:
        os.link(source, staged)
    except OSError:
        shutil.copyfile(source, staged)
    os.replace(staged, target)


def _local_dir(location: str | None) -> Path | None:
    """The logged model's artifact folder where it is on this machine's file system."""
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(url2pathname(parsed.path) if parsed.scheme else location)
    return None


def share_storage(graph: Path, logged: Path | None) -> bool:
    """Make the logged model's ``model.onnx`` a hard link to the sweep folder's ``graph``
    where the two files are byte for byte the same and on one file system, so the graph is
    stored once; returns whether it did. Either name stays valid when the other is deleted.
    A remote store or another file system keeps its copy."""
    if logged is None:
        return False
    copy = logged / "model.onnx"
    try:
        if not copy.is_file() or copy.stat().st_size != graph.stat().st_size:
            return False
        if os.path.samefile(copy, graph) or not filecmp.cmp(copy, graph, shallow=False):
            return False
        staged = copy.with_name(copy.name + ".link")
        staged.unlink(missing_ok=True)
        os.link(graph, staged)
        os.replace(staged, copy)
    except OSError:  # another device, a file system without hard links: keep the copy
        return False
    return True


def _embeddable(model: Any) -> bool:
    """Whether the graph with its weights fits one protobuf file."""
    try:
        return bool(model.ByteSize() < EMBED_LIMIT_BYTES)
    except (ValueError, OverflowError):  # protobuf refuses to size a message over 2 GiB
        return False


def onnx_signature(model: Any) -> Any:
    """An MLflow tensor signature of the graph's inputs and outputs (symbolic dims -1)."""
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    def specs(values: Any) -> Schema:
        out: list[ColSpec | TensorSpec] = []
        for value in values:
            tensor = value.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
            out.append(TensorSpec(dtype, shape, value.name))
        return Schema(out)

    return ModelSignature(inputs=specs(model.graph.input), outputs=specs(model.graph.output))
