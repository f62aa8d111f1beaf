"""Datasets that need no download: scikit-learn's bundled digits and seeded noise.

``digits`` is the 1,797 labelled 8x8 handwritten digits that ship inside scikit-learn,
upsampled to 28x28 so MNIST-shaped models (the seed MLP) take them unchanged.
``synthetic`` is seeded Gaussian input shaped like the model's example input, unlabelled.
``text`` is the corpus that ships with qatbench as next-token sequences (see ``text.py``);
``sentences`` the same corpus as sentences for encoders (see ``sentences.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from qatbench.data.inputs import Batch, Inputs, describe, tensors_of
from qatbench.errors import ConfigError
from qatbench.user_code import resolve_factory

if TYPE_CHECKING:  # configs of the spec layer above, for annotations only
    from qatbench.spec.schema import DataSpec


@dataclass(frozen=True)
class TaskData:
    """Disjoint splits; ``*_y`` are None when the dataset has no labels."""

    name: str
    train_x: Batch
    train_y: torch.Tensor | None
    calib_x: Batch
    eval_x: Batch
    eval_y: torch.Tensor | None
    num_classes: int | None
    task: str = "classification"  # a key of qatbench.data.tasks.TASKS

    @property
    def labelled(self) -> bool:
        return self.eval_y is not None


def load_data(spec: DataSpec, example: Batch, seed: int) -> TaskData:
    """The dataset named in ``spec``, split with ``seed``."""
    if spec.factory:
        return _from_factory(spec, example, seed)
    problem = input_problem(spec, example)
    if problem:  # also checked at validate; a factory may build differently here
        raise ConfigError(problem)
    if spec.dataset == "digits":
        assert isinstance(example, torch.Tensor)  # input_problem said so
        return _digits(spec, example, seed)
    if spec.dataset == "text":
        from qatbench.data.text import load_text

        assert isinstance(example, torch.Tensor)  # input_problem said so

        return load_text(
            spec.seq_len,
            spec.calibration_samples,
            spec.eval_samples,
            example,
            seed,
            spec.tokenizer,
        )
    if spec.dataset == "sentences":
        from qatbench.data.sentences import load_sentences

        evaluation, calibration, train = load_sentences(
            example, spec.calibration_samples, spec.eval_samples, seed, spec.tokenizer
        )
        return TaskData(
            "sentences", train, None, calibration, evaluation, None, None, task="embedding"
        )
    return _synthetic(spec, example, seed)


DIGITS_SAMPLE = (28, 28)  # the 8x8 digits upsampled to MNIST's shape


def input_problem(spec: DataSpec, example: Batch) -> str | None:
    """Why the dataset cannot feed a model with this example input, or None if it can.
    Needs only the example's shape and dtype (a model built on the meta device will do)."""
    if spec.dataset == "digits":
        if (
            isinstance(example, torch.Tensor)
            and example.dtype.is_floating_point
            and example[0].numel() == DIGITS_SAMPLE[0] * DIGITS_SAMPLE[1]
        ):
            return None  # [batch, 28, 28] for an MLP, [batch, 1, 28, 28] for a CNN
        return (
            f"data.dataset 'digits' gives 28x28 float images; this model's example "
            f"input is {describe(example)}"
        )
    if spec.dataset == "sentences":
        from qatbench.data.sentences import input_problem as sentences_problem

        return sentences_problem(example)
    if spec.dataset == "text":
        from qatbench.data.text import text_input_problem

        if isinstance(example, Inputs):
            return (
                f"data.dataset 'text' gives token ids alone; this model takes {describe(example)}"
            )
        return text_input_problem(example, spec.seq_len)
    return None  # synthetic data is shaped like the example


def _from_factory(spec: DataSpec, example: Batch, seed: int) -> TaskData:
    """A user's data: ``factory(example=..., seed=..., calibration_samples=...,
    eval_samples=..., **options)`` returns a :class:`TaskData` whose inputs have the
    structure of the model's example (a tensor, or :class:`Inputs` of as many tensors)."""
    assert spec.factory is not None
    factory = resolve_factory(spec.factory, "data.factory")
    data = factory(
        example=example,
        seed=seed,
        calibration_samples=spec.calibration_samples,
        eval_samples=spec.eval_samples,
        **spec.options,
    )
    where = f"data.factory {spec.factory!r}"
    if not isinstance(data, TaskData):
        raise ConfigError(f"{where} returned {type(data).__name__}, not a TaskData")
    for split in ("calib_x", "eval_x", "train_x"):
        problem = _structure_problem(getattr(data, split), example)
        if problem:
            raise ConfigError(f"{where}: {split} {problem}")
    return data


def _structure_problem(batch: Batch, example: Batch) -> str | None:
    """Why ``batch`` cannot feed a model whose example is ``example``, or None."""
    got, want = tensors_of(batch), tensors_of(example)
    if len(got) != len(want) or not all(
        g.dtype == w.dtype and g.shape[1:] == w.shape[1:] for g, w in zip(got, want, strict=False)
    ):
        return f"is {describe(batch)}; the model's example is {describe(example)}"
    return None


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
    # Calibration comes from a pool held out of training (a quarter of what eval leaves, 321
    # samples with the default 512 for eval): a search that validates on it (keep_fp32:
    # auto) sees the margins of unseen data, not of data the model fits. The pool does not
    # depend on calibration_samples, so neither does the training split (the pretraining
    # cache's key).
    pool = (len(x) - n_eval) // 4
    eval_idx = order[:n_eval]
    calib_idx = order[n_eval : n_eval + min(spec.calibration_samples, pool)]
    train_idx = order[n_eval + pool :]
    return TaskData(
        name="digits",
        train_x=x[train_idx],
        train_y=y[train_idx],
        calib_x=x[calib_idx],
        eval_x=x[eval_idx],
        eval_y=y[eval_idx],
        num_classes=10,
    )


def _synthetic(spec: DataSpec, example: Batch, seed: int) -> TaskData:
    """Seeded data shaped and typed like each example input: Gaussian floats; integers
    (token ids) uniform below ``data.vocab_size`` or the example's largest value + 1;
    masks (bool, or integers that are all 0 or 1) all ones, every position attended."""
    gen = torch.Generator().manual_seed(seed)

    def like(t: torch.Tensor, n: int) -> torch.Tensor:
        shape = (n, *t.shape[1:])
        if t.dtype.is_floating_point:
            return torch.randn(shape, generator=gen).to(t.dtype)
        if t.dtype == torch.bool or (t.numel() and bool(((t == 0) | (t == 1)).all())):
            return torch.ones(shape, dtype=t.dtype)
        high = spec.vocab_size or int(t.max()) + 1
        return torch.randint(0, max(high, 2), shape, generator=gen, dtype=t.dtype)

    def make(n: int) -> Batch:
        return (
            example.map(lambda t: like(t, n)) if isinstance(example, Inputs) else like(example, n)
        )

    calib, evaluation = make(spec.calibration_samples), make(spec.eval_samples)
    return TaskData(
        name="synthetic",
        train_x=calib,
        train_y=None,
        calib_x=calib,
        eval_x=evaluation,
        eval_y=None,
        num_classes=None,
    )


def batches(x: Batch, batch_size: int) -> list[Any]:
    return list(x.split(batch_size))
