"""What a dataset asks of a model: the training loss and the quality metrics of its outputs.

``classification`` (digits): logits ``[n, classes]`` against labels ``[n]``; cross-entropy;
``accuracy`` in percent. ``language_modelling`` (text): logits ``[n, time, vocab]``
against the next tokens ``[n, time]``; mean token cross-entropy; ``perplexity`` (exp of
the mean negative log-likelihood per token), ``next_token_accuracy`` in percent (argmax is
the next token) and ``bits_per_token``. Each metric comes with ``*_fp32`` (the same metric of
the fp32 reference outputs) and ``*_delta_vs_fp32`` (this minus fp32).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from qatbench.data.datasets import TaskData


class Task:
    """The loss a model is trained with and the metrics its outputs are judged by."""

    name: ClassVar[str]
    # +1 where a higher value of the metric is better, -1 where lower is: read by quality
    # budgets and the pick (qatbench/measure/directions.py); a task plugin declares its own.
    directions: ClassVar[dict[str, int]] = {}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Quality of ``outputs`` alone (higher- or lower-is-better per metric)."""
        raise NotImplementedError

    def quality(
        self, outputs: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, float]:
        """``metrics`` of ``outputs``, of the fp32 ``reference`` and their differences."""
        mine = self.metrics(outputs, targets)
        fp32 = self.metrics(reference, targets)
        out = dict(mine)
        for key, value in mine.items():
            out[f"{key}_fp32"] = fp32[key]
            out[f"{key}_delta_vs_fp32"] = value - fp32[key]
        return out


class Classification(Task):
    name = "classification"
    directions: ClassVar[dict[str, int]] = {"accuracy": 1}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        hits = (outputs.argmax(dim=-1) == targets).double().mean()
        return {"accuracy": 100.0 * float(hits)}


class LanguageModelling(Task):
    name = "language_modelling"
    directions: ClassVar[dict[str, int]] = {
        "perplexity": -1,
        "next_token_accuracy": 1,
        "bits_per_token": -1,
    }

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten())

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        logits = outputs.flatten(0, -2).float()
        flat = targets.flatten()
        nll = float(F.cross_entropy(logits, flat, reduction="mean"))
        hits = (logits.argmax(dim=-1) == flat).double().mean()
        return {
            "perplexity": math.exp(min(nll, 700.0)),  # stays a finite float
            "next_token_accuracy": 100.0 * float(hits),
            "bits_per_token": nll / math.log(2),
        }


TASKS: dict[str, Task] = {t.name: t for t in (Classification(), LanguageModelling())}


def task_for(data: TaskData) -> Task:
    """The task of a dataset (``TaskData.task``)."""
    return TASKS[data.task]


def task_directions() -> dict[str, int]:
    """The declared direction of every metric of every task (see ``Task.directions``)."""
    out: dict[str, int] = {}
    for task in TASKS.values():
        out.update(task.directions)
    return out
