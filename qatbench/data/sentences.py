"""``sentences``: sentences of the shipped corpus for encoders, as token ids and a mask.

The corpus of :mod:`qatbench.data.text` (standard-library docstrings) cut into sentences
of 6 to 60 words, tokenized one by one with ``data.tokenizer`` (a local Hugging Face
tokenizer directory, usually the encoder's own; ``bytes`` gives UTF-8 bytes), truncated
or padded to the model's example length, with an attention mask of ones on real tokens.
Unlabelled: the ``embedding`` task judges the outputs against fp32's. Feeds models whose
example inputs are ``(input_ids, attention_mask)``, as ``hf_encoder`` builds them.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from qatbench.data.inputs import Batch, Inputs, describe
from qatbench.errors import ConfigError

MIN_WORDS, MAX_WORDS = 6, 60


@lru_cache(maxsize=1)
def corpus_sentences() -> tuple[str, ...]:
    from qatbench.data.text import corpus_text

    flat = re.sub(r"\s+", " ", corpus_text())
    pieces = re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat)
    return tuple(s for s in pieces if MIN_WORDS <= len(s.split()) <= MAX_WORDS)


def input_problem(example: Batch) -> str | None:
    if (
        isinstance(example, Inputs)
        and len(example.args) == 2
        and not any(t.dtype.is_floating_point for t in example.args)
    ):
        return None
    return (
        "data.dataset 'sentences' gives (input_ids, attention_mask), both integer; this "
        f"model's example is {describe(example)}"
    )


def load_sentences(
    example: Batch, calibration_samples: int, eval_samples: int, seed: int, tokenizer: str
) -> tuple[Inputs, Inputs, Inputs]:
    """Evaluation, calibration and training inputs (the last two disjoint from the first)."""
    problem = input_problem(example)
    if problem:
        raise ConfigError(problem)
    assert isinstance(example, Inputs)
    seq_len = example.args[0].shape[1]
    sentences = corpus_sentences()
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))
    n_eval = min(eval_samples, len(sentences) // 4)
    chosen = order[: n_eval + calibration_samples].tolist()
    ids, mask = _encode([sentences[i] for i in chosen], tokenizer, seq_len)
    dtype_ids, dtype_mask = example.args[0].dtype, example.args[1].dtype
    everything = Inputs((ids.to(dtype_ids), mask.to(dtype_mask)))
    evaluation, rest = everything[:n_eval], everything[n_eval:]
    return evaluation, rest, rest


def _encode(texts: list[str], tokenizer: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    from qatbench.data.text import tokenize

    ids = torch.zeros(len(texts), seq_len, dtype=torch.long)
    mask = torch.zeros(len(texts), seq_len, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = tokenize(text, tokenizer)[:seq_len]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask
