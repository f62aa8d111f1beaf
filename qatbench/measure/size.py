"""Bytes of deployable artifacts and of weights resident in memory."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch


def save_torch_artifact(model: torch.nn.Module, path: Path) -> int:
    """Serialize the state dict (packed integers stay packed); returns bytes on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path.stat().st_size


def torch_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as held in memory for inference."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the graph's initializers (the weights a session keeps resident)."""
    model = onnx.load(str(path))
    total = 0
    for init in model.graph.initializer:
        if init.raw_data:  # as stored: sub-byte integers stay packed
            total += len(init.raw_data)
        else:
            total += onnx.numpy_helper.to_array(init).nbytes
    return total
