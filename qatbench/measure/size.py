"""Bytes of deployable artifacts and of weights resident in memory."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import IO, Any, cast

import onnx
import torch

from qatbench.runtimes.onnx_weights import load_structure


def save_torch_artifact(model: torch.nn.Module, path: Path) -> int:
    """Serialize the state dict (packed integers stay packed); returns bytes on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path.stat().st_size


class _ByteCount(io.RawIOBase):
    """A seekable write-only sink that keeps only the size of what was written (seekable,
    so torch.save writes the same zip layout as to a file)."""

    def __init__(self) -> None:
        self.position = 0
        self.size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def write(self, data: Any) -> int:
        written = memoryview(data).nbytes
        self.position += written
        self.size = max(self.size, self.position)
        return written


def torch_artifact_bytes(model: torch.nn.Module) -> int:
    """Bytes ``torch.save`` writes for the state dict, counted without writing a file (the
    size of :func:`save_torch_artifact`'s file, give or take the name stored inside)."""
    sink = _ByteCount()
    torch.save(model.state_dict(), cast(IO[bytes], sink))
    return sink.size


def torch_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as held in memory for inference."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the graph's initializers (the weights a session keeps resident)."""
    model = load_structure(path)  # sizes, not the weights
    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in init.external_data}
            total += int(entries["length"]) if "length" in entries else _dense_bytes(init)
        elif init.raw_data:  # as stored: sub-byte integers stay packed
            total += len(init.raw_data)
        else:
            total += onnx.numpy_helper.to_array(init).nbytes
    return total


def _dense_bytes(init: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return int(itemsize * math.prod(init.dims))


def _layer_weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """``module name -> bytes`` of each module's own weight matrices and kernels (its
    parameters of two or more dimensions: Linear, Conv, Embedding weights)."""
    sizes: dict[str, int] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
        if own:
            sizes[name] = sum(p.numel() * p.element_size() for p in own)
    return sizes


def _still_float(before: torch.nn.Module, after: torch.nn.Module | None) -> bool:
    if after is None or type(after) is not type(before):
        return after is None
    weight = getattr(after, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    plain = type(weight) in (torch.Tensor, torch.nn.Parameter) and not weight.is_quantized
    return plain and weight.is_floating_point()


def quantized_weight_fraction(fp32: torch.nn.Module, candidate: torch.nn.Module) -> float:
    """Share of ``fp32``'s weight bytes (matrices and kernels) whose layer the candidate
    replaced or stores in another format: 0 when it left every layer as it was.

    A layer counts as quantized when the candidate's module of the same name is of another
    class (an integer or fake-quant replacement) or holds its weight as integers or as a
    tensor subclass (torchao). Missing from the candidate counts as not quantized. Casts
    to bf16/fp16 keep the class and a floating weight, so they count as not quantized.
    """
    sizes = _layer_weight_bytes(fp32)
    total = sum(sizes.values())
    if not total:
        return 0.0
    quantized = 0
    for name, nbytes in sizes.items():
        try:
            after: torch.nn.Module | None = candidate.get_submodule(name)
        except AttributeError:
            after = None
        if not _still_float(fp32.get_submodule(name), after):
            quantized += nbytes
    return quantized / total


def onnx_quantized_weight_fraction(fp32: torch.nn.Module, path: Path) -> float:
    """The same share read from an exported graph (for methods that quantize while
    exporting): one minus the bytes of floating-point initializers of two or more
    dimensions left in the graph, over ``fp32``'s weight bytes."""
    total = sum(_layer_weight_bytes(fp32).values())
    if not total:
        return 0.0
    model = load_structure(path)  # sizes are in the dims
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    left = 0
    for init in model.graph.initializer:
        if init.data_type in floating and len(init.dims) >= 2:
            left += 4 * math.prod(init.dims)  # counted as fp32
    return max(0.0, 1.0 - left / total)
