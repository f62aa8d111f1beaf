"""``keep_fp32: auto``: the fewest most sensitive layers kept in fp32 that bring a model
within the experiment's quality budget.

The trial owns data and time, the method owns the model: the search only configures the
method (``keep_fp32`` as an explicit list) and quantizes through the one driver
(:func:`qatbench.methods.lifecycle.quantize_copy`), so every method that takes
``keep_fp32`` gets ``auto`` without code of its own.

1. Quantize every layer (the plain method). Within budget on the validation data: done.
2. Rank the quantized layers by sensitivity: each layer's output SQNR against the fp32 layer
   on the same calibration inputs (:func:`qatbench.measure.error.layer_errors`), worst first.
3. Keep the ``k`` worst in fp32, ``k`` found by bisection between 0 (fails) and all ranked
   layers but one (one layer at least stays quantized), assuming that keeping more layers
   never hurts: about ``2 + log2(layers)`` quantizations in all.

Validation data is never the evaluation data the report shows: the calibration inputs,
judged against the fp32 model's outputs on them. A classifier's accuracy there is taken
against the fp32 model's own predictions, so its change is minus the share of predictions
quantization flipped: never smaller than the true accuracy change, a conservative bound
(the training split would flatter: the model fits it with wide margins, which is why the
digits dataset holds its calibration samples out of training). A task that needs
targets of another kind (a language model's next tokens) is judged on the training split with
its labels. No configuration within budget: the best one found (the smallest shortfall) is
kept and the trial says the budget was not met.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from qatbench.data.datasets import TaskData
from qatbench.data.inputs import Batch, batch_of
from qatbench.data.tasks import Classification, Task, checked_quality, task_directions
from qatbench.measure import error as err
from qatbench.report.pick import Budget

VALIDATION_SAMPLES = 512  # of the training split, at most (tasks with targets of their own)


@dataclass
class SearchResult:
    """What the search kept, what it tried, what it cost and whether the budget held."""

    kept: list[str]  # layer names kept in fp32, most sensitive first
    ranking: list[str]  # every quantized layer, most sensitive first
    candidates: int  # configurations quantized and judged
    seconds: float
    met: bool
    validation: dict[str, float] = field(default_factory=dict)  # the kept config's figures
    misses: list[str] = field(default_factory=list)  # budget bounds it misses, if any


def validation_split(
    data: TaskData, task: Task | None, fp32: Callable[[Batch], torch.Tensor]
) -> tuple[Batch, torch.Tensor, torch.Tensor | None]:
    """Inputs to judge candidates on, the fp32 outputs on them, and targets where the task
    needs them (see the module doc)."""
    inputs: Batch = data.calib_x
    targets: torch.Tensor | None = None
    wants = task is not None and task.needs_targets
    if wants and not isinstance(task, Classification) and data.train_y is not None:
        n = min(VALIDATION_SAMPLES, len(data.train_y))
        inputs, targets = batch_of(data.train_x, n), data.train_y[:n]
    reference = fp32(inputs)
    if wants and isinstance(task, Classification):  # fp32's predictions are the labels
        targets = reference.argmax(dim=-1)
    return inputs, reference, targets


def judge(
    outputs: torch.Tensor,
    reference: torch.Tensor,
    targets: torch.Tensor | None,
    task: Task | None,
    fp32_quality: Mapping[str, float],
) -> dict[str, float]:
    """Output error against fp32, and the task's metrics with their change against fp32."""
    metrics = dict(err.output_error(reference, outputs))
    if task is not None and (targets is not None or not task.needs_targets):
        quality = checked_quality(task, outputs, reference, targets)
        for name, value in quality.items():
            metrics[name] = value
            delta = f"{name}_delta_vs_fp32"
            if name in task.directions and delta not in quality:  # a task that gives none
                metrics[delta] = value - fp32_quality[name]
    return metrics


def search_keep_fp32(
    quantize: Callable[[list[str]], torch.nn.Module],
    fp32: torch.nn.Module,
    data: TaskData,
    task: Task | None,
    budget: Mapping[str, float],
    predict: Callable[[torch.nn.Module, Batch], torch.Tensor],
) -> SearchResult:
    """The fewest most sensitive layers to keep in fp32 for ``budget`` (see the module doc).

    ``quantize(keep)`` is the method's converted copy of ``fp32`` with ``keep`` in fp32;
    ``predict(model, inputs)`` its outputs, batched as the trial batches them.
    """
    start = time.perf_counter()
    declared = task_directions(*([task] if task is not None else []))
    accepted = Budget.from_mapping(budget, declared)
    inputs, reference, targets = validation_split(data, task, lambda x: predict(fp32, x))
    fp32_quality = (
        checked_quality(task, reference, reference, targets)
        if task is not None and (targets is not None or not task.needs_targets)
        else {}
    )
    plain = quantize([])
    layers = err.layer_errors(fp32, plain, batch_of(data.calib_x, 64))
    ranking = [str(row["layer"]) for row in layers]
    tried: dict[int, tuple[float, dict[str, float]]] = {}  # k -> (shortfall, metrics)

    def attempt(k: int, model: torch.nn.Module | None = None) -> bool:
        model = model if model is not None else quantize(ranking[:k])
        metrics = judge(predict(model, inputs), reference, targets, task, fp32_quality)
        shortfall = accepted.shortfall_in(metrics)
        tried[k] = (shortfall, metrics)
        return shortfall == 0

    if not attempt(0, plain) and len(ranking) > 1:
        # lo fails; is hi enough: every ranked layer in fp32 but the least sensitive (at
        # least one layer stays quantized, or the model is the fp32 one)
        lo, hi = 0, len(ranking) - 1
        if attempt(hi):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if attempt(mid):
                    hi = mid
                else:
                    lo = mid
    met = [k for k, (short, _) in tried.items() if short == 0]
    best = min(met) if met else min(tried, key=lambda k: (tried[k][0], k))
    metrics = tried[best][1]
    return SearchResult(
        kept=ranking[:best],
        ranking=ranking,
        candidates=len(tried),
        seconds=time.perf_counter() - start,
        met=bool(met),
        validation=metrics,
        misses=accepted.misses_in(metrics),
    )
