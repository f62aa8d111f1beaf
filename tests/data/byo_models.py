"""Models a user brings through ``factory:``: a tiny BERT with two int64 inputs given by
name (saved with save_pretrained into a temporary folder, nothing downloaded), and small
modules with structured outputs or a wrong example."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def tiny_bert(seq_len: int = 16) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertModel

    folder = Path(os.environ["QATBENCH_TEST_BERT"])
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=500,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        BertModel(config).save_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    ids = torch.randint(0, 500, (1, seq_len))
    return model, {"input_ids": ids, "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}


class TwoHeads(torch.nn.Module):
    """Returns a dict: ``scores`` and ``features``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.body(x))
        return {"features": features, "scores": self.head(features)}


def two_heads() -> tuple[torch.nn.Module, torch.Tensor]:
    return TwoHeads(), torch.zeros(1, 8)


def bad_example() -> tuple[torch.nn.Module, Any]:
    return torch.nn.Linear(8, 4), [torch.zeros(1, 8), "not a tensor"]


from qatbench.data.tasks import Task  # noqa: E402  # the user's metric plugins below


class MeanAbsShift(Task):
    """A user's metric: how far the outputs moved from fp32's, on average."""

    name = "mean_abs_shift"
    directions = {"mean_abs_shift": "lower"}  # noqa: RUF012
    needs_targets = False

    def quality(self, outputs: Any, reference: Any, targets: Any) -> dict[str, float]:
        return {"mean_abs_shift": float((outputs - reference).abs().mean())}


class Chatty(MeanAbsShift):
    name = "chatty"

    def quality(self, outputs: Any, reference: Any, targets: Any) -> dict[str, Any]:
        return {"verdict": "fine"}


def wrong_width(example: Any, seed: int, calibration_samples: int, eval_samples: int) -> Any:
    """A data factory whose inputs are 5 wide where the model takes 8."""
    from qatbench.data.datasets import TaskData

    x = torch.randn(8, 5)
    return TaskData("wrong", x, None, x, x, None, None)
