"""The weights of an exported graph: streamed to disk by the exporter, read where a graph
pass needs them, saved inline or in one external-data file beside the graph.

A trial's memory is the model's weights plus what its runtime needs, so no step of the
export holds a second copy of the weights in a protobuf message:

- :func:`captured_weights` lets ``torch.onnx.export`` (the TorchScript exporter) write the
  graph without its initializers and hands back the tensors it would have copied into the
  message (the model's own parameters and buffers, shared, and the tensors constant folding
  made, such as a ``MatMul``'s transposed weight);
- :func:`attach_weights` streams those tensors, one at a time, into ``<graph>.data`` and
  turns the graph inputs the exporter made of them into initializers that point there;
- :func:`load_weights` reads the few tensors a graph pass needs (quantizer scales, packed
  integer weights) back into the message;
- :func:`save_graph` writes the result: one file when the weights come to at most
  ``EXTERNAL_DATA_BYTES``, else ``model.onnx`` and one ``model.onnx.data`` holding every
  weight once, which onnxruntime maps while the trial runs;
- :func:`store_inline` makes a graph one file again once its trial is done, up to
  ``INLINE_LIMIT_BYTES`` (MLflow's UI downloads one file that ``onnx.load`` reads, and
  MLflow's logged model shares it by a hard link).

Peak memory of an export is then the model plus what constant folding created (the
TorchScript exporter folds every transposed weight; about the size of the Linear weights);
before, the message, its serialised bytes and a reloaded copy were resident at once (a
0.25B Llama: 4.6x its fp32 weights during export, see docs/language-models.md).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
import torch
from onnx import TensorProto

#: Graphs whose weights pass this are saved with every weight in one external-data file:
#: onnxruntime maps such a file, where it parses and copies weights inside the graph
#: (a 0.25B Llama's fp32 graph: a session peaked 0.9 GiB above its start against 1.4; its
#: 253 MiB rtn w4 graph held 0.13 GiB more while measured from one file).
EXTERNAL_DATA_BYTES = 64 * 1024**2
#: A graph kept after its trial (:func:`store_inline`) is one file up to this: a protobuf
#: message holds 2 GiB, and onnx's loader refuses an external-data file with two links,
#: so only a single file can be shared with MLflow's logged model by a hard link.
INLINE_LIMIT_BYTES = 2 * 1024**3 - 64 * 1024**2
#: Tensors smaller than this stay in the message (scales, zero points, shapes).
INLINE_TENSOR_BYTES = 1024
ALIGN = 64  # offsets of tensors in the data file (vector loads, page-mapped reads)

_ONNX_TYPES = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE,
    torch.int8: TensorProto.INT8,
    torch.uint8: TensorProto.UINT8,
    torch.int16: TensorProto.INT16,
    torch.int32: TensorProto.INT32,
    torch.int64: TensorProto.INT64,
    torch.bool: TensorProto.BOOL,
}


def data_path(graph: Path) -> Path:
    """The external-data file of the graph at ``graph``: ``<name>.data`` beside it."""
    return graph.with_name(graph.name + ".data")


@contextlib.contextmanager
def captured_weights() -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``torch.onnx.export(..., dynamo=False)`` writes its graph without
    initializers: each becomes a graph input of its name, shape and type, and its tensor
    lands in the yielded dict (pass both to :func:`attach_weights`).

    It intercepts the one call that encodes the graph (``torch._C.Graph._export_onnx``,
    whose first argument is the name-to-tensor dict of initializers; torch is pinned) and
    hands it an empty dict."""
    graph_type = torch._C.Graph
    original = graph_type._export_onnx  # type: ignore[attr-defined]
    weights: dict[str, torch.Tensor] = {}

    def without_weights(graph: torch._C.Graph, params: dict, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        weights.update(params)
        return original(graph, {}, *args, **kwargs)

    graph_type._export_onnx = without_weights  # type: ignore[attr-defined]
    try:
        yield weights
    finally:
        graph_type._export_onnx = original  # type: ignore[attr-defined]


def attach_weights(model: onnx.ModelProto, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Make the graph inputs named in ``weights`` initializers: small ones in the message,
    the others appended, one tensor at a time, to ``path``'s external-data file (created
    afresh). ``model`` is then saved with :func:`save_graph` at ``path``."""
    graph = model.graph
    inputs = [value for value in graph.input if value.name not in weights]
    del graph.input[:]
    graph.input.extend(inputs)
    data = data_path(path)
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(data, "wb") as sink:
        for name, tensor in weights.items():
            graph.initializer.append(_tensor_proto(name, tensor.detach().cpu(), sink, data.name))
    if data.stat().st_size == 0:
        data.unlink()


def _tensor_proto(name: str, tensor: torch.Tensor, sink: BinaryIO, location: str) -> TensorProto:
    if tensor.dtype not in _ONNX_TYPES:
        raise TypeError(f"initializer {name!r}: no ONNX type for {tensor.dtype}")
    proto = TensorProto(name=name, data_type=_ONNX_TYPES[tensor.dtype], dims=list(tensor.shape))
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    if raw.nbytes < INLINE_TENSOR_BYTES:
        proto.raw_data = raw.tobytes()
        return proto
    _write_external(proto, memoryview(raw.data), sink, location)
    return proto


def _write_external(
    proto: TensorProto, raw: bytes | memoryview, sink: BinaryIO, location: str
) -> None:
    """Append ``raw`` to the open file ``sink`` at the next aligned offset and point
    ``proto`` there."""
    offset = sink.seek(0, os.SEEK_END)
    padding = -offset % ALIGN
    sink.write(b"\0" * padding)
    sink.write(raw)
    proto.ClearField("raw_data")
    proto.data_location = TensorProto.EXTERNAL
    del proto.external_data[:]
    length = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    for key, value in (("location", location), ("offset", offset + padding), ("length", length)):
        entry = proto.external_data.add()
        entry.key, entry.value = key, str(value)


def _external(tensor: TensorProto) -> dict[str, str]:
    if tensor.data_location != TensorProto.EXTERNAL:
        return {}
    return {entry.key: entry.value for entry in tensor.external_data}


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the graph: initializers, and attributes' (Constant nodes, subgraphs)."""
    yield from _graph_tensors(model.graph)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def load_weights(
    model: onnx.ModelProto, base_dir: Path, names: Iterable[str] | None = None
) -> None:
    """Read the external data of the initializers named ``names`` (all: ``None``) into the
    message; a graph pass that reads values calls it for what it reads."""
    from onnx.external_data_helper import load_external_data_for_tensor

    wanted = None if names is None else set(names)
    for tensor in _all_tensors(model):
        if _external(tensor) and (wanted is None or tensor.name in wanted):
            load_external_data_for_tensor(tensor, str(base_dir))


def load_structure(path: Path) -> onnx.ModelProto:
    """The graph at ``path`` without its weights in memory: external tensors stay
    external, and each initializer stored inside the file becomes a tensor pointing to
    the bytes of its ``raw_data`` in that very file (``location`` the file's name), so
    the graph passes, :func:`weight_bytes` and :func:`save_graph` read it like external
    data (tensors under ``INLINE_TENSOR_BYTES`` stay in the message). Only the file's
    headers are read; the weights are never paged in."""
    path = Path(path)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        head, graph_at, graph_end = _field_span(view, 0, len(view), 7)
        if graph_at is None:
            return onnx.load_model_from_string(bytes(view))
        parts = [bytes(view[:head])]
        graph: list[bytes] = []
        for number, pos, body, end in _fields(view, graph_at, graph_end):
            if number == 5:  # an initializer: its raw_data becomes a reference
                graph.append(_referenced_tensor(view, body, end, path.name))
            else:
                graph.append(bytes(view[pos:end]))
        graph_bytes = b"".join(graph)
        parts += [_key(7), _varint(len(graph_bytes)), graph_bytes, bytes(view[graph_end:])]
    return onnx.load_model_from_string(b"".join(parts))


def _fields(data: bytes | mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The top-level fields of the message in ``data[start:end]``: (field number, offset
    of its key, offset of its body, end), the body of a length-delimited field without
    its length prefix."""
    pos = start
    while pos < end:
        key, at = _read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, nxt = _read_varint(data, at)
        elif wire == 2:
            length, at = _read_varint(data, at)
            nxt = at + length
        elif wire in (1, 5):
            nxt = at + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"not an ONNX model: protobuf wire type {wire}")
        yield key >> 3, pos, at, nxt
        pos = nxt


def _field_span(data: mmap.mmap, start: int, end: int, field: int) -> tuple[int, int | None, int]:
    """(offset of ``field``'s key, offset of its body, end of its body) among the
    top-level fields of the message in ``data[start:end]``; (end, None, end) if absent."""
    for number, pos, body, nxt in _fields(data, start, end):
        if number == field:
            return pos, body, nxt
    return end, None, end


def _referenced_tensor(data: mmap.mmap, start: int, end: int, location: str) -> bytes:
    """The initializer record ``data[start:end]`` with its ``raw_data`` (field 9)
    replaced by a reference to where those bytes are in the file."""
    fields: list[bytes] = []
    raw: tuple[int, int] | None = None
    for number, pos, body, nxt in _fields(data, start, end):
        if number == 9 and nxt - body >= INLINE_TENSOR_BYTES:
            raw = (body, nxt - body)
        else:
            fields.append(bytes(data[pos:nxt]))
    if raw is None:  # small, or not stored as raw_data: kept as it is
        return _key(5) + _varint(end - start) + bytes(data[start:end])
    tensor = TensorProto.FromString(b"".join(fields))
    for name, value in (("location", location), ("offset", raw[0]), ("length", raw[1])):
        entry = tensor.external_data.add()
        entry.key, entry.value = name, str(value)
    tensor.data_location = TensorProto.EXTERNAL
    record = tensor.SerializeToString()
    return _key(5) + _varint(len(record)) + record


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every tensor of the graph, in the message or in external data."""
    total = 0
    for tensor in _all_tensors(model):
        info = _external(tensor)
        total += int(info.get("length", 0)) if info else len(tensor.raw_data)
    return total


def save_graph(
    model: onnx.ModelProto,
    path: Path,
    base_dir: Path | None = None,
    external_bytes: int | None = None,
) -> None:
    """Save ``model`` at ``path``: one file when its weights come to at most
    ``EXTERNAL_DATA_BYTES`` (written tensor by tensor, :func:`write_inline`), else with
    every tensor of ``INLINE_TENSOR_BYTES`` or more in ``<name>.data`` beside it, each
    once (bytes no tensor points to any more are dropped).

    ``base_dir`` is where the external data ``model`` points to lives (default: beside
    ``path``); ``external_bytes`` replaces ``EXTERNAL_DATA_BYTES``. Either way memory
    stays the size of the message plus one tensor."""
    path = Path(path)
    base_dir = Path(base_dir) if base_dir is not None else path.parent
    data = data_path(path)
    limit = EXTERNAL_DATA_BYTES if external_bytes is None else external_bytes
    if weight_bytes(model) <= limit:
        staged = path.with_name(path.name + ".tmp")
        write_inline(model, staged, base_dir)
        os.replace(staged, path)
        data.unlink(missing_ok=True)
        return
    tensors = list(_all_tensors(model))
    sources = {_external(t)["location"] for t in tensors if _external(t)}
    live = sum(int(_external(t).get("length", 0)) for t in tensors)
    in_place = (
        base_dir.resolve() == path.parent.resolve()
        and sources <= {data.name}
        and (not sources or data.stat().st_size - live <= live // 100)
    )
    if in_place:  # the data file holds nothing stale: append what the message holds
        with open(data, "ab") as sink:
            for tensor in tensors:
                if not _external(tensor) and len(tensor.raw_data) >= INLINE_TENSOR_BYTES:
                    _write_external(tensor, tensor.raw_data, sink, data.name)
    else:  # stale bytes, or another folder: copy each live tensor to a new file
        staged = data.with_name(data.name + ".tmp")
        with open(staged, "wb") as sink:
            for tensor in tensors:
                info = _external(tensor)
                if info:
                    raw = _read_range(base_dir / info["location"], info)
                elif len(tensor.raw_data) >= INLINE_TENSOR_BYTES:
                    raw = tensor.raw_data
                else:
                    continue
                _write_external(tensor, raw, sink, data.name)
        os.replace(staged, data)
    onnx.save(model, str(path))


def store_inline(path: Path) -> bool:
    """Rewrite the graph at ``path`` as one file (its data file folded in and removed)
    where its weights come to at most ``INLINE_LIMIT_BYTES``; returns whether it did.
    Memory: the structure plus one tensor."""
    path = Path(path)
    if not data_path(path).exists():
        return False
    model = load_structure(path)
    if weight_bytes(model) > INLINE_LIMIT_BYTES:
        return False
    staged = path.with_name(path.name + ".tmp")
    try:
        write_inline(model, staged, path.parent)
    except BaseException:
        staged.unlink(missing_ok=True)  # the graph as it was stays whole
        raise
    os.replace(staged, path)
    data_path(path).unlink()
    return True


def write_inline(model: onnx.ModelProto, path: Path, base_dir: Path) -> None:
    """Write ``model`` with every weight inside one file, reading external tensors from
    ``base_dir`` one at a time: the bytes ``model.SerializeToString()`` would give once
    its weights were loaded, without the whole message ever being in memory.

    Protobuf writes a message's fields in field-number order, and the graph's
    initializers (field 5 of ``GraphProto``, inside field 7 of ``ModelProto``) are
    length-prefixed records whose lengths are known before their bytes are read: the
    model is written as its fields before the graph, the graph's fields before its
    initializers, each initializer, then the rest."""
    for tensor in _graph_tensors_outside_initializers(model.graph):
        if _external(tensor):  # a Constant node's tensor: part of the structure
            load_weights(model, base_dir, [tensor.name])
    initializers = list(model.graph.initializer)
    del model.graph.initializer[:]
    try:
        graph_head, graph_tail = _split_fields(model.graph.SerializeToString(), before=5)
        records = [(_record_length(t), t) for t in initializers]
        graph_length = len(graph_head) + len(graph_tail)
        graph_length += sum(len(_key(5)) + len(_varint(n)) + n for n, _ in records)
        shell = onnx.ModelProto()
        shell.CopyFrom(model)
        shell.ClearField("graph")
        model_head, model_tail = _split_fields(shell.SerializeToString(), before=7)
        with open(path, "wb") as sink:
            sink.write(model_head + _key(7) + _varint(graph_length) + graph_head)
            for length, tensor in records:
                sink.write(_key(5) + _varint(length))
                sink.write(_loaded(tensor, base_dir).SerializeToString())
            sink.write(graph_tail + model_tail)
    finally:
        model.graph.initializer.extend(initializers)


def _graph_tensors_outside_initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    initializers = {id(t) for t in graph.initializer}
    return (t for t in _graph_tensors(graph) if id(t) not in initializers)


def _loaded(tensor: TensorProto, base_dir: Path) -> TensorProto:
    """``tensor`` with its bytes inside (a copy when they were external)."""
    info = _external(tensor)
    if not info:
        return tensor
    loaded = TensorProto()
    loaded.CopyFrom(tensor)
    loaded.raw_data = _read_range(base_dir / info["location"], info)
    loaded.ClearField("data_location")
    del loaded.external_data[:]
    return loaded


def _record_length(tensor: TensorProto) -> int:
    """The serialised size of ``tensor`` with its bytes inside, without reading them."""
    info = _external(tensor)
    if not info:
        return tensor.ByteSize()
    shell = TensorProto()
    shell.CopyFrom(tensor)
    shell.ClearField("data_location")
    del shell.external_data[:]
    length = int(info["length"])
    raw_field = len(_key(9)) + len(_varint(length)) + length  # raw_data is field 9
    return shell.ByteSize() + raw_field


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # a length-delimited field


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _split_fields(message: bytes, before: int) -> tuple[bytes, bytes]:
    """``message``'s serialised fields numbered below ``before``, and the others."""
    for number, pos, _body, _end in _fields(message, 0, len(message)):
        if number >= before:
            return message[:pos], message[pos:]
    return message, b""


def _read_varint(data: bytes | mmap.mmap, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _read_range(file: Path, info: dict[str, str]) -> bytes:
    with open(file, "rb") as source:
        source.seek(int(info.get("offset", 0)))
        length = info.get("length")
        return source.read(int(length)) if length is not None else source.read()
