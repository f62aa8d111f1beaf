"""The shipped corpus, its byte-level splits, the ``text`` dataset spec and the LM task."""

from __future__ import annotations

import math

import pytest
import torch

from qatbench.data.datasets import load_data
from qatbench.data.tasks import Classification, LanguageModelling, task_for
from qatbench.data.text import (
    build_stdlib_corpus,
    corpus_digest,
    corpus_text,
    decode_bytes,
    load_text,
    tokenize,
)
from qatbench.errors import ConfigError
from qatbench.spec.schema import DataSpec

CONTEXT = torch.zeros(1, 64, dtype=torch.long)


def test_corpus_ships_with_the_package_and_is_the_recorded_snapshot() -> None:
    text = corpus_text()
    assert len(text.encode()) == 501_446  # see qatbench/data/corpus/README.md
    assert corpus_digest() == "e542f9402546"
    assert "Abstract Base Classes" in text[:200]


def test_the_builder_reads_standard_library_docstrings() -> None:
    text = build_stdlib_corpus(["textwrap"])
    assert "wrap" in text and len(text) > 1000


def test_byte_tokenizer_round_trips() -> None:
    ids = tokenize("héllo, wörld")
    assert ids.dtype == torch.long and int(ids.max()) < 256
    assert decode_bytes(ids) == "héllo, wörld"


def test_splits_are_next_token_pairs_and_disjoint() -> None:
    data = load_text(32, 20, 50, CONTEXT, seed=0)
    assert data.task == "language_modelling" and data.num_classes == 256
    assert data.train_x.shape[1] == 32 and data.eval_x.shape == (50, 32)
    assert data.calib_x.shape == (20, 32)
    assert data.train_y is not None and data.eval_y is not None
    # targets are the inputs shifted by one token
    assert torch.equal(data.train_x[:, 1:], data.train_y[:, :-1])
    assert torch.equal(data.eval_x[:, 1:], data.eval_y[:, :-1])
    train = {tuple(r.tolist()) for r in data.train_x}
    assert not any(tuple(r.tolist()) in train for r in data.eval_x)
    assert all(tuple(r.tolist()) in train for r in data.calib_x)
    tokens = len(corpus_text().encode())
    assert len(data.train_x) * 33 > 0.9 * tokens  # about 95% of the text is training text


def test_splits_are_deterministic_per_seed() -> None:
    a, b = load_text(32, 8, 16, CONTEXT, seed=3), load_text(32, 8, 16, CONTEXT, seed=3)
    c = load_text(32, 8, 16, CONTEXT, seed=4)
    assert torch.equal(a.calib_x, b.calib_x) and torch.equal(a.eval_x, b.eval_x)
    assert not torch.equal(a.calib_x, c.calib_x)
    assert a.name == b.name and "s32" in a.name


def test_sequence_length_defaults_to_the_context_and_may_not_exceed_it() -> None:
    assert load_text(None, 4, 4, CONTEXT, seed=0).eval_x.shape[1] == 64
    with pytest.raises(ConfigError, match=r"seq_len: 65 .* context of 64"):
        load_text(65, 4, 4, CONTEXT, seed=0)


def test_a_model_that_takes_no_token_ids_is_refused() -> None:
    with pytest.raises(ConfigError, match="token ids"):
        load_text(None, 4, 4, torch.zeros(1, 28, 28), seed=0)


def test_text_is_a_dataset_of_the_spec() -> None:
    spec = DataSpec(dataset="text", seq_len=16, calibration_samples=4, eval_samples=8)
    data = load_data(spec, CONTEXT, seed=0)
    assert data.eval_x.shape == (8, 16) and data.labelled
    assert isinstance(task_for(data), LanguageModelling)
    with pytest.raises(ValueError):
        DataSpec(dataset="text", seq_len=1)


def test_unknown_local_tokenizer_is_a_config_error() -> None:
    pytest.importorskip("transformers", reason="a Hugging Face tokenizer needs transformers")
    with pytest.raises(ConfigError, match="tokenizer"):
        tokenize("x", "/nonexistent/tokenizer")


def test_language_modelling_metrics() -> None:
    task = LanguageModelling()
    targets = torch.randint(0, 256, (2, 10))
    uniform = torch.zeros(2, 10, 256)
    m = task.metrics(uniform, targets)
    assert m["perplexity"] == pytest.approx(256.0)
    assert m["bits_per_token"] == pytest.approx(8.0)
    perfect = torch.nn.functional.one_hot(targets, 256).float() * 50
    assert task.metrics(perfect, targets)["perplexity"] == pytest.approx(1.0)
    assert task.metrics(perfect, targets)["next_token_accuracy"] == 100.0
    q = task.quality(uniform, perfect, targets)
    assert q["perplexity_fp32"] == pytest.approx(1.0)
    assert q["perplexity_delta_vs_fp32"] == pytest.approx(255.0)
    assert q["next_token_accuracy_delta_vs_fp32"] <= 0
    loss = task.loss(uniform, targets)
    assert float(loss) == pytest.approx(math.log(256))


def test_classification_keeps_its_metric_names() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    q = Classification().quality(logits, logits, labels)
    assert q["accuracy"] == pytest.approx(200 / 3)
    assert q["accuracy_delta_vs_fp32"] == 0.0
    assert set(q) == {"accuracy", "accuracy_fp32", "accuracy_delta_vs_fp32"}
