"""Datasets that need no download: scikit-learn's bundled digits and seeded noise.

``digits`` is the 1,797 labelled 8x8 handwritten digits that ship inside scikit-learn,
upsampled to 28x28 so MNIST-shaped models (the seed MLP) take them unchanged.
``synthetic`` is seeded Gaussian input shaped like the model's example input, unlabelled.
``text`` is the corpus that ships with qatbench as next-token sequences (see ``text.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:  # configs of the spec layer above, for annotations only
    from qatbench.spec.schema import DataSpec


@dataclass(frozen=True)
class TaskData:
    """Disjoint splits; ``*_y`` are None when the dataset has no labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor | None
    calib_x: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor | None
    num_classes: int | None
    task: str = "classification"  # a key of qatbench.data.tasks.TASKS

    @property
    def labelled(self) -> bool:
        return self.eval_y is not None


def load_data(spec: DataSpec, example: torch.Tensor, seed: int) -> TaskData:
    """The dataset named in ``spec``, split with ``seed``."""
    if spec.dataset == "digits":
        return _digits(spec, example, seed)
    if spec.dataset == "text":
        from qatbench.data.text import load_text

        return load_text(
            spec.seq_len,
            spec.calibration_samples,
            spec.eval_samples,
            example,
            seed,
            spec.tokenizer,
        )
    return _synthetic(spec, example, seed)


def _digits(spec: DataSpec, example: torch.Tensor, seed: int) -> TaskData:
    from sklearn.datasets import load_digits  # ships the data inside the package

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False).squeeze(1)
    x = (x - x.mean()) / x.std()
    if example[0].numel() == x[0].numel():  # [N, 28, 28] for the MLP, [N, 1, 28, 28] for CNNs
        x = x.reshape(len(x), *example.shape[1:])
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_eval = min(spec.eval_samples, len(x) // 3)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    calib_idx = train_idx[: spec.calibration_samples]
    return TaskData(
        name="digits",
        train_x=x[train_idx],
        train_y=y[train_idx],
        calib_x=x[calib_idx],
        eval_x=x[eval_idx],
        eval_y=y[eval_idx],
        num_classes=10,
    )


def _synthetic(spec: DataSpec, example: torch.Tensor, seed: int) -> TaskData:
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(example.shape[1:])
    calib = torch.randn((spec.calibration_samples, *shape), generator=gen)
    evaluation = torch.randn((spec.eval_samples, *shape), generator=gen)
    return TaskData(
        name="synthetic",
        train_x=calib,
        train_y=None,
        calib_x=calib,
        eval_x=evaluation,
        eval_y=None,
        num_classes=None,
    )


def batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(x.split(batch_size))
