"""The user's own data: sentences shipped with the package, tokenized by hashing words into
the encoder's vocabulary, padded to the model's length with an attention mask.

``sentences`` is the data factory named in the experiment's ``data.factory``; qatbench
calls it with the model's example inputs, a seed and the sample counts, plus ``options``.
"""

from __future__ import annotations

import zlib
from importlib.resources import files
from typing import Any

import torch

from qatbench.data.datasets import TaskData
from qatbench.data.inputs import Inputs


def _tokenize(line: str, vocab_size: int, seq_len: int) -> tuple[list[int], list[int]]:
    ids = [1 + zlib.crc32(w.lower().encode()) % (vocab_size - 1) for w in line.split()][:seq_len]
    pad = seq_len - len(ids)
    return ids + [0] * pad, [1] * len(ids) + [0] * pad


def sentences(
    example: Inputs,
    seed: int,
    calibration_samples: int,
    eval_samples: int,
    vocab_size: int = 2048,
) -> TaskData:
    ids_example, _mask = example.args
    seq_len = ids_example.shape[1]
    lines = [s for s in files(__package__).joinpath("sentences.txt").read_text().splitlines() if s]
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [_tokenize(lines[i], vocab_size, seq_len) for i in order]
    ids = torch.tensor([r[0] for r in rows])
    mask = torch.tensor([r[1] for r in rows])
    n_eval = min(eval_samples, len(rows) // 2)
    evaluation: Any = Inputs((ids[:n_eval], mask[:n_eval]))
    rest = Inputs((ids[n_eval:], mask[n_eval:]))
    calibration = rest[:calibration_samples]
    return TaskData(
        name="byo_sentences",
        train_x=rest,
        train_y=None,
        calib_x=calibration,
        eval_x=evaluation,
        eval_y=None,
        num_classes=None,
    )
