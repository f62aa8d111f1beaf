"""The seed MLP: 784-512-256-128-10 on 28x28 images."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class MlpConfig:
    in_features: int = 784
    hidden: tuple[int, ...] = field(default=(512, 256, 128))
    num_classes: int = 10


class Mlp(nn.Module):
    """Flatten, then Linear+ReLU blocks, then a Linear classifier."""

    def __init__(self, config: MlpConfig) -> None:
        super().__init__()
        self.config = config
        widths = (config.in_features, *config.hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for w_in, w_out in itertools.pairwise(widths):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], config.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_mlp(**options: object) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``mlp``; options are :class:`MlpConfig` fields."""
    if "hidden" in options:
        options["hidden"] = tuple(options["hidden"])  # type: ignore[arg-type]  # YAML gives a list
    config = MlpConfig(**options)  # type: ignore[arg-type]  # validated by the dataclass itself
    side = round(config.in_features**0.5)
    example = (
        torch.zeros(1, side, side)
        if side * side == config.in_features
        else torch.zeros(1, config.in_features)
    )
    return Mlp(config), (example,)
