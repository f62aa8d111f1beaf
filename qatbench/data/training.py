"""Training and calibration loops owned by the runner, and the trained-weights cache.

Pretraining follows a per-task recipe. Digits keeps the recipe its cached weights were
trained with (AdamW at a constant 2e-3). Language models are trained to convergence on the
corpus with a linear warm-up and a cosine decay of the learning rate to a twentieth of its
peak, so a few more steps of fine-tuning at a small learning rate no longer lower the fp32
perplexity: what QAT's fine-tuning recovers is then the quantization error, not
undertraining.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qatbench.data.datasets import TaskData, batches
from qatbench.data.inputs import call
from qatbench.data.tasks import TASKS


@dataclass(frozen=True)
class Recipe:
    """How a task's model is pretrained: AdamW at ``lr``, optionally warm-up + cosine."""

    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "constant"  # or "cosine"
    warmup_fraction: float = 0.0
    final_lr_fraction: float = 1.0


DEFAULT_RECIPE = Recipe()
RECIPES: dict[str, Recipe] = {
    "language_modelling": Recipe(
        lr=2e-3, schedule="cosine", warmup_fraction=0.05, final_lr_fraction=0.05
    ),
}


def forward_loop(data: TaskData, batch_size: int) -> Callable[[torch.nn.Module], None]:
    """The calibration loop: every calibration batch through ``model``, no gradients."""

    def run(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for xb in batches(data.calib_x, batch_size):
                call(model, xb)

    return run


class TrainLoop:
    """``loop(model, optimizer, steps)``: ``steps`` optimisation steps of the task's loss
    (cross-entropy of the classes or of the next tokens) on shuffled training batches.

    ``steps_per_epoch`` is how many steps one pass over the training data takes, so a method
    can be told its training length in epochs. With a ``recipe`` whose schedule is cosine,
    each call sets the optimizer's learning rate per step: a linear warm-up, then a cosine
    decay over the call's ``steps`` (its peak is the recipe's ``lr``).
    """

    def __init__(
        self, data: TaskData, batch_size: int, seed: int, recipe: Recipe | None = None
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.recipe = recipe
        self.task = TASKS[data.task]  # the dataset's own loss
        self.steps_per_epoch = max(1, -(-len(data.train_x) // batch_size))

    def __call__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int
    ) -> None:
        data = self.data
        if data.train_y is None:
            raise ValueError(f"dataset {data.name!r} has no labels to train on")
        gen = torch.Generator().manual_seed(self.seed)
        model.train()
        done = 0
        while done < steps:
            for idx in torch.randperm(len(data.train_x), generator=gen).split(self.batch_size):
                if self.recipe is not None and self.recipe.schedule == "cosine":
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(self.recipe, done, steps)
                optimizer.zero_grad(set_to_none=True)
                loss = self.task.loss(call(model, data.train_x[idx]), data.train_y[idx])
                loss.backward()
                optimizer.step()
                done += 1
                if done >= steps:
                    break
        model.eval()


def learning_rate(recipe: Recipe, step: int, steps: int) -> float:
    """The recipe's learning rate at ``step`` of ``steps`` (0-based)."""
    if recipe.schedule != "cosine":
        return recipe.lr
    warmup = int(recipe.warmup_fraction * steps)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    final = recipe.final_lr_fraction * recipe.lr
    return final + 0.5 * (recipe.lr - final) * (1.0 + math.cos(math.pi * progress))


def train_loop(data: TaskData, batch_size: int, seed: int) -> TrainLoop:
    """The loop methods fine-tune with: the optimizer's own (constant) learning rate."""
    return TrainLoop(data, batch_size, seed)


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

    The key is completed with the model's architecture, tensor shapes and the task's
    training recipe (where it is not the original constant one, so older caches stay
    valid), so a changed default never loads stale weights.

    Returns the model and whether the cache was hit. The cache file is written atomically,
    so concurrent trials at worst train twice; weights are loaded with ``weights_only``.
    """
    recipe = RECIPES.get(data.task, DEFAULT_RECIPE)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    identity = {**key, "architecture": str(model), "shapes": shapes}
    if recipe != DEFAULT_RECIPE:
        identity["recipe"] = asdict(recipe)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir() / f"{digest[:20]}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model, True
    loop = TrainLoop(data, batch_size, seed, recipe)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    loop(model, optimizer, epochs * loop.steps_per_epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, False
