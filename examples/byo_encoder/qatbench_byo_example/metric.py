"""The user's own quality metric: does quantization keep the embeddings' lengths?

``NormRatio`` is the task named in the experiment's ``task.factory``. A task returns named
metrics with their direction; qatbench logs them with every trial, and they can be used in
``expect:``, ``compare --gate`` and pytest items like the built-in metrics.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qatbench.data.tasks import Task


class NormRatio(Task):
    name = "norm_ratio"
    directions: ClassVar[dict[str, str]] = {
        "norm_ratio_worst": "higher",
        "embedding_cosine_worst": "higher",
    }
    needs_targets = False

    def quality(
        self, outputs: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor | None
    ) -> dict[str, float]:
        ratio = outputs.norm(dim=1) / reference.norm(dim=1).clamp(min=1e-12)
        cosine = torch.nn.functional.cosine_similarity(outputs, reference, dim=1)
        return {
            "norm_ratio_worst": float(torch.minimum(ratio, 1 / ratio).min()),
            "embedding_cosine_worst": float(cosine.min()),
        }
