"""Training and calibration loops owned by the runner, and the trained-weights cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from qatbench.data.datasets import TaskData, batches
from qatbench.data.tasks import task_for


def forward_loop(data: TaskData, batch_size: int) -> Callable[[torch.nn.Module], None]:
    """The calibration loop: every calibration batch through ``model``, no gradients."""

    def run(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for xb in batches(data.calib_x, batch_size):
                model(xb)

    return run


def train_loop(
    data: TaskData, batch_size: int, seed: int
) -> Callable[[torch.nn.Module, torch.optim.Optimizer, int], None]:
    """``steps`` optimisation steps of the task's loss (cross-entropy of the classes or of
    the next tokens) on shuffled training batches."""
    task = task_for(data)

    def run(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        if data.train_y is None:
            raise ValueError(f"dataset {data.name!r} has no labels to train on")
        gen = torch.Generator().manual_seed(seed)
        model.train()
        done = 0
        while done < steps:
            for idx in torch.randperm(len(data.train_x), generator=gen).split(batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss = task.loss(model(data.train_x[idx]), data.train_y[idx])
                loss.backward()
                optimizer.step()
                done += 1
                if done >= steps:
                    break
        model.eval()

    return run


def cache_dir() -> Path:
    return Path(os.environ.get("QATBENCH_CACHE", ".qatbench-cache"))


def pretrained(
    model: torch.nn.Module,
    key: dict[str, object],
    data: TaskData,
    epochs: int,
    batch_size: int,
    seed: int,
) -> tuple[torch.nn.Module, bool]:
    """Train ``model`` on ``data`` for ``epochs``, or load cached weights of the same key.

    The key is completed with the model's architecture and tensor shapes, so a changed
    default in a model config never loads stale weights.

    Returns the model and whether the cache was hit. The cache file is written atomically,
    so concurrent trials at worst train twice; weights are loaded with ``weights_only``.
    """
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    identity = {**key, "architecture": str(model), "shapes": shapes}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir() / f"{digest[:20]}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model, True
    steps = epochs * -(-len(data.train_x) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    train_loop(data, batch_size, seed)(model, optimizer, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, False
