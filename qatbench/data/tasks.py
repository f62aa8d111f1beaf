"""Quality tasks: how a trial's outputs are judged, and the loss a model is trained with.

A task turns the evaluation outputs, the fp32 reference outputs and the targets (None on
unlabelled data) into named metrics, each with its direction (``directions``: "higher" or
"lower" is better), logged like the built-ins and usable in ``expect:``, gates and
reports. Built-ins, chosen by the dataset unless the experiment's ``task:`` names one:

- ``classification`` (digits): logits ``[n, classes]`` against labels ``[n]``;
  cross-entropy; ``accuracy`` in percent.
- ``language_modelling`` (text): logits ``[n, time, vocab]`` against the next tokens;
  ``perplexity`` (exp of the mean negative log-likelihood per token),
  ``next_token_accuracy`` in percent and ``bits_per_token``.
- ``embedding`` (any data, no targets): outputs are embeddings (``[n, dim]``, or
  ``[n, tokens, dim]`` mean-pooled over the tokens); ``embedding_cosine`` is the mean
  per-sample cosine to fp32's embedding, ``retrieval_agreement`` the share (percent) of
  samples whose nearest neighbour among the others is the same as with fp32's.

Target-based metrics come with ``*_fp32`` (the same metric of the fp32 outputs) and
``*_delta_vs_fp32`` (this minus fp32). A task of your own is a :class:`Task` subclass (or
an instance) named by ``task: {factory: "package.module:name"}``, or registered in the
``qatbench.tasks`` entry-point group; for example::

    class TopTwo(Task):
        name = "top_two"
        directions = {"top2_accuracy": "higher"}

        def metrics(self, outputs, targets):
            hits = (outputs.topk(2).indices == targets[:, None]).any(dim=1)
            return {"top2_accuracy": 100.0 * float(hits.double().mean())}
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch.nn import functional as F

from qatbench.errors import PluginError

if TYPE_CHECKING:
    from qatbench.data.datasets import TaskData


class Task:
    """The loss a model is trained with and the metrics its outputs are judged by."""

    name: ClassVar[str]
    # metric -> "higher" or "lower" is better: read by the report, quality budgets and the
    # pick (qatbench/measure/directions.py); a task plugin declares its own.
    directions: ClassVar[dict[str, str]] = {}
    needs_targets: ClassVar[bool] = True  # False: judged against the fp32 outputs alone

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Quality of ``outputs`` alone (higher- or lower-is-better per metric)."""
        raise NotImplementedError

    def quality(
        self, outputs: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor | None
    ) -> dict[str, float]:
        """``metrics`` of ``outputs``, of the fp32 ``reference`` and their differences."""
        assert targets is not None  # needs_targets: the caller checks
        mine = self.metrics(outputs, targets)
        fp32 = self.metrics(reference, targets)
        out = dict(mine)
        for key, value in mine.items():
            out[f"{key}_fp32"] = fp32[key]
            out[f"{key}_delta_vs_fp32"] = value - fp32[key]
        return out


class Classification(Task):
    name = "classification"
    directions: ClassVar[dict[str, str]] = {"accuracy": "higher"}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        hits = (outputs.argmax(dim=-1) == targets).double().mean()
        return {"accuracy": 100.0 * float(hits)}


class LanguageModelling(Task):
    name = "language_modelling"
    directions: ClassVar[dict[str, str]] = {
        "perplexity": "lower",
        "next_token_accuracy": "higher",
        "bits_per_token": "lower",
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


class Embedding(Task):
    name = "embedding"
    directions: ClassVar[dict[str, str]] = {
        "embedding_cosine": "higher",
        "retrieval_agreement": "higher",
    }
    needs_targets = False

    def quality(
        self, outputs: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor | None
    ) -> dict[str, float]:
        mine, fp32 = _pooled(outputs), _pooled(reference)
        cosine = F.cosine_similarity(mine, fp32, dim=1, eps=1e-12)
        return {
            "embedding_cosine": float(cosine.mean()),
            "retrieval_agreement": 100.0
            * float((_nearest(mine) == _nearest(fp32)).double().mean()),
        }


def _pooled(outputs: torch.Tensor) -> torch.Tensor:
    """``[n, dim]`` embeddings: token dimensions mean-pooled."""
    x = outputs.float()
    return x.flatten(1, -2).mean(dim=1) if x.dim() > 2 else x.reshape(len(x), -1)


def _nearest(embeddings: torch.Tensor) -> torch.Tensor:
    """Each sample's nearest other sample by cosine similarity."""
    unit = F.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    return similarity.argmax(dim=1)


TASKS: dict[str, Task] = {t.name: t for t in (Classification(), LanguageModelling(), Embedding())}


def task_for(data: TaskData, chosen: Task | None = None) -> Task | None:
    """The task that judges this trial: ``chosen`` (the experiment's ``task:``), else the
    dataset's own (``TaskData.task``); None where there is none (unlabelled data)."""
    if chosen is not None:
        return chosen
    own = TASKS[data.task]
    return own if data.labelled or not own.needs_targets else None


def checked_quality(
    task: Task, outputs: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor | None
) -> dict[str, float]:
    """The task's metrics, each a finite-or-not float; one line naming the task and the
    metric when a value is not a number."""
    values = task.quality(outputs, reference, targets)
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PluginError(
                f"task {task.name!r}: metric {key!r} is {type(value).__name__}, not a number"
            )
        out[key] = float(value)
    return out


def task_directions(*tasks: Task) -> dict[str, int]:
    """The declared direction of every metric of the built-in tasks and of ``tasks``, as +1
    (higher is better) or -1 (lower is)."""
    out: dict[str, int] = {}
    for task in (*TASKS.values(), *tasks):
        out.update({k: 1 if v == "higher" else -1 for k, v in task.directions.items()})
    return out
