"""Observers: statistics of activations seen during calibration, and the range they choose.

Every observer has ``observe(x)`` (called on each calibration batch), ``seen`` and
``range() -> (lo, hi)``, the float range the quantizer should cover (0-d tensors):

- :class:`MinMaxObserver`: the running minimum and maximum.
- :class:`MovingAverageMinMaxObserver`: per-batch minimum and maximum, exponentially
  averaged with ``averaging_constant`` (PyTorch's convention: the first batch sets them).
- :class:`PercentileObserver`: the ``100 - p`` and ``p`` percentiles of every value seen
  (numpy's linear interpolation; beyond ``max_samples`` values a strided subsample is kept).
- :class:`MseObserver`: shrinks the min-max range by the factor (on a grid of ``steps``)
  that minimizes the expected squared quantization error of a histogram of the data.
- :class:`KlObserver`: TensorRT's entropy calibration: the clipping threshold on ``|x|``
  whose quantized distribution is closest (KL divergence) to the clipped one.

The histogram observers keep ``bins`` bins over ``[-R, R]``; when a batch exceeds ``R`` the
range doubles and neighbouring bins merge, so the histogram stays exact at its resolution.

A method's config picks one with :data:`ObserverChoice`: ``observer: kl`` or
``observer: {name: percentile, percentile: 99.9}``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from qatbench.quant.affine import asymmetric_qparams, int_range

MAX_KL_CANDIDATES = 512


class Observer(torch.nn.Module):
    """Base of observers; ``bits`` is the width the observed tensor will be quantized to.

    Every observer keeps the raw extremes it saw in ``min_val`` and ``max_val`` (0-d
    tensors); ``range()`` is what it chooses, which may clip them.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @torch.no_grad()
    def _track(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the raw extremes with ``x``; returns ``x``'s own (min, max)."""
        lo, hi = x.detach().min().float(), x.detach().max().float()
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)
        return lo, hi

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def seen(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running per-tensor minimum and maximum of everything passed through ``observe``."""

    def observe(self, x: torch.Tensor) -> None:
        self._track(x)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """``v <- v + c * (batch_v - v)`` for the minimum and maximum; the first batch sets them."""

    average_min: torch.Tensor
    average_max: torch.Tensor

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01) -> None:
        super().__init__(bits)
        self.averaging_constant = averaging_constant
        self.register_buffer("average_min", torch.tensor(float("inf")))
        self.register_buffer("average_max", torch.tensor(float("-inf")))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        first = not self.seen
        lo, hi = self._track(x)
        if first:
            self.average_min, self.average_max = lo, hi
            return
        c = self.averaging_constant
        self.average_min = self.average_min + c * (lo - self.average_min)
        self.average_max = self.average_max + c * (hi - self.average_max)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.average_min, self.average_max


class PercentileObserver(Observer):
    """Range ``(percentile(100 - p), percentile(p))`` of the values seen, as numpy computes it."""

    def __init__(self, bits: int = 8, percentile: float = 99.99, max_samples: int = 1 << 24):
        super().__init__(bits)
        self.percentile = percentile
        self.max_samples = max_samples
        self._chunks: list[torch.Tensor] = []
        self._stored = 0
        self._stride = 1

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        self._track(x)
        flat = x.detach().float().flatten()[:: self._stride].clone()
        self._chunks.append(flat)
        self._stored += flat.numel()
        while self._stored > self.max_samples:  # keep every other value from now on
            self._chunks = [torch.cat(self._chunks)[::2].clone()]
            self._stored = self._chunks[0].numel()
            self._stride *= 2

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.cat(self._chunks).numpy()
        lo, hi = np.percentile(values, [100.0 - self.percentile, self.percentile])
        return torch.tensor(float(lo)), torch.tensor(float(hi))


class _HistogramObserver(Observer):
    """A histogram of ``bins`` bins over ``[-R, R]``, ``R`` doubling as larger values arrive."""

    def __init__(self, bits: int = 8, bins: int = 2048) -> None:
        super().__init__(bits)
        if bins < 4 or bins % 4:
            raise ValueError(f"bins must be a multiple of 4, got {bins}")
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.bound = 0.0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if not x.numel():
            return
        lo, hi = self._track(x)
        need = max(abs(float(lo)), abs(float(hi)))
        if self.bound == 0.0:
            self.bound = need if need > 0 else 1.0
        while need > self.bound:
            # Doubling [-R, R]: pairs of old bins become the middle half of the new ones.
            merged = self.hist.reshape(-1, 2).sum(dim=1)
            quarter = self.bins // 4
            self.hist = torch.cat([merged.new_zeros(quarter), merged, merged.new_zeros(quarter)])
            self.bound *= 2
        self.hist += torch.histc(x, self.bins, -self.bound, self.bound).double()

    def _centers(self) -> torch.Tensor:
        width = 2 * self.bound / self.bins
        return -self.bound + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)


class MseObserver(_HistogramObserver):
    """Range ``alpha * (min, max)`` with ``alpha`` on a grid of ``steps`` values in (0, 1],
    minimizing the histogram's squared error after asymmetric ``bits``-bit quantization."""

    def __init__(self, bits: int = 8, bins: int = 2048, steps: int = 100) -> None:
        super().__init__(bits, bins)
        self.steps = steps

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
        centers, counts = self._centers(), self.hist
        qmin, qmax = int_range(self.bits, signed=False)
        alphas = torch.arange(1, self.steps + 1, dtype=torch.float64) / self.steps
        best, best_err = 1.0, math.inf
        for alpha in alphas.tolist():
            scale, zp = asymmetric_qparams(
                torch.tensor(alpha * lo), torch.tensor(alpha * hi), self.bits
            )
            s, z = float(scale), float(zp)
            q = torch.round(centers / s + z).clamp(qmin, qmax)
            err = float((counts * (centers - (q - z) * s) ** 2).sum())
            if err < best_err:
                best, best_err = alpha, err
        return torch.tensor(best * lo), torch.tensor(best * hi)


class KlObserver(_HistogramObserver):
    """TensorRT-style entropy calibration on ``|x|``: the threshold ``T`` minimizing
    ``KL(P || Q)`` of the clipped histogram ``P`` and its quantization ``Q``; the range is
    ``(max(min, -T), min(max, T))``. ``Q`` has ``2^(bits-1)`` levels on ``[0, T]`` when the
    data has both signs, ``2^bits`` when it is one-signed (all levels land on one side)."""

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.bins // 2
        h = self.hist.numpy()
        folded = h[half:] + h[:half][::-1]  # |x| histogram over [0, R], `half` bins
        lo, hi = float(self.min_val), float(self.max_val)
        one_signed = lo >= 0 or hi <= 0
        levels = 2**self.bits if one_signed else 2 ** (self.bits - 1)
        i_best = kl_threshold_bin(folded, levels)
        threshold = i_best * self.bound / half
        lo, hi = max(lo, -threshold), min(hi, threshold)
        return torch.tensor(lo), torch.tensor(hi)


def kl_threshold_bin(hist: np.ndarray, levels: int) -> int:
    """The number of leading bins of ``hist`` (``|x|``, ascending) that TensorRT's entropy
    calibration keeps: minimizes KL(reference || quantized into ``levels`` bins). At most
    :data:`MAX_KL_CANDIDATES` evenly spaced thresholds are tried (every bin when fewer)."""
    n = len(hist)
    if n <= levels:
        return n
    best_i, best_kl = n, math.inf
    total_tail = np.cumsum(hist[::-1])[::-1]  # total_tail[i] = sum(hist[i:])
    stride = max(1, (n - levels) // MAX_KL_CANDIDATES)
    candidates = [*range(levels, n, stride), n]
    for i in candidates:
        ref = hist[:i].astype(np.float64).copy()
        if i < n:
            ref[i - 1] += total_tail[i]
        if ref.sum() == 0:
            continue
        edges = np.floor(np.arange(levels + 1) * (i / levels)).astype(np.int64)
        edges[-1] = i
        chunk = hist[:i]
        nonzero = (chunk != 0).astype(np.float64)
        sums = np.add.reduceat(chunk, edges[:-1])
        counts = np.add.reduceat(nonzero, edges[:-1])
        spread = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        q = np.repeat(spread, np.diff(edges)) * nonzero
        kl = _kl_divergence(ref, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def _kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL(p || q) of histograms (counts), ``q`` smoothed as MXNet/TensorRT do: ``eps`` moved
    onto its empty bins from the others, before normalizing."""
    zeros = q == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if n_nonzero == 0:
        return math.inf
    q = q + eps * zeros - (eps * n_zero / n_nonzero) * (~zeros)
    mask = p > 0
    if np.any(q[mask] <= 0):
        return math.inf
    p = p / p.sum()
    q = q / q.sum()
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


# ---- configs: pick an observer by name in a method's options ------------------------------


class _ObserverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def build(self, bits: int = 8) -> Observer:
        raise NotImplementedError


class MinMaxConfig(_ObserverConfig):
    name: Literal["minmax"] = "minmax"

    def build(self, bits: int = 8) -> Observer:
        return MinMaxObserver(bits)


class MovingAverageConfig(_ObserverConfig):
    name: Literal["moving_average"] = "moving_average"
    averaging_constant: float = Field(0.01, gt=0, le=1, description="weight of each new batch")

    def build(self, bits: int = 8) -> Observer:
        return MovingAverageMinMaxObserver(bits, self.averaging_constant)


class PercentileConfig(_ObserverConfig):
    name: Literal["percentile"] = "percentile"
    percentile: float = Field(99.99, gt=50, le=100, description="upper percentile kept")

    def build(self, bits: int = 8) -> Observer:
        return PercentileObserver(bits, self.percentile)


class MseConfig(_ObserverConfig):
    name: Literal["mse"] = "mse"
    bins: int = Field(2048, ge=16, multiple_of=4)
    steps: int = Field(100, ge=1, le=10_000, description="clipping factors tried in (0, 1]")

    def build(self, bits: int = 8) -> Observer:
        return MseObserver(bits, self.bins, self.steps)


class KlConfig(_ObserverConfig):
    name: Literal["kl"] = "kl"
    bins: int = Field(2048, ge=16, multiple_of=4)

    def build(self, bits: int = 8) -> Observer:
        return KlObserver(bits, self.bins)


OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "kl")


def _by_name(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


_Tagged = Annotated[
    MinMaxConfig | MovingAverageConfig | PercentileConfig | MseConfig | KlConfig,
    Field(discriminator="name"),
]
ObserverChoice = Annotated[_Tagged, BeforeValidator(_by_name)]
"""``observer: kl`` or ``observer: {name: percentile, percentile: 99.9}`` in a config."""
