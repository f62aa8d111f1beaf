"""One ``nn.Linear``: the plainest GEMM workload, where a kernel's speed shows undiluted.

``linear`` takes its sizes as options; ``linear4096`` is the 4096x4096 preset (64 MiB of
fp32 weights, larger than any cache, so batch-1 latency is bound by reading the weights:
the case integer weights are for). Its inputs are plain vectors, so it runs on the
``synthetic`` dataset (seeded Gaussian inputs, no labels), which is enough for
calibration and for every output-error metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LinearConfig:
    in_features: int = 4096
    out_features: int = 4096
    bias: bool = True


class LinearModel(nn.Module):
    """``y = x W^T + b`` on ``[batch, in_features]`` inputs."""

    def __init__(self, config: LinearConfig) -> None:
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.in_features, config.out_features, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def build_linear(**options: object) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``linear``; options are :class:`LinearConfig` fields."""
    config = LinearConfig(**options)  # type: ignore[arg-type]  # validated by the dataclass
    return LinearModel(config), (torch.zeros(1, config.in_features),)


def build_linear4096(**options: object) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``linear4096``: :func:`build_linear` with 4096 inputs and outputs."""
    return build_linear(**{"in_features": 4096, "out_features": 4096, **options})
