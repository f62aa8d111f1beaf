"""Observers: running statistics of activations seen during calibration."""

from __future__ import annotations

import torch


class MinMaxObserver(torch.nn.Module):
    """Running per-tensor minimum and maximum of everything passed through ``observe``."""

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, x.detach().min().float())
        self.max_val = torch.maximum(self.max_val, x.detach().max().float())

    @property
    def seen(self) -> bool:
        return bool(torch.isfinite(self.min_val))
