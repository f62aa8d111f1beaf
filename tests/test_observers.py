"""Observers: the ranges they choose, their configs, and ptq driven by each."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from qatbench.methods.ptq import PtqMethod
from qatbench.models.mlp import Mlp, MlpConfig
from qatbench.quant.bitwidth import BitWidth
from qatbench.quant.observers import (
    OBSERVERS,
    KlConfig,
    KlObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MseObserver,
    ObserverChoice,
    PercentileConfig,
    PercentileObserver,
    kl_threshold_bin,
)

CHOICE: TypeAdapter[object] = TypeAdapter(ObserverChoice)


def _heavy_tailed(n: int = 100_000, seed: int = 0) -> torch.Tensor:
    """Student-t with 2 degrees of freedom: most mass near 0, rare huge values."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=gen)
    chi2 = torch.randn(n, 2, generator=gen).pow(2).sum(1)
    return z / (chi2 / 2).sqrt()


def _feed(observer: torch.nn.Module, x: torch.Tensor, batches: int = 10) -> None:
    for xb in x.chunk(batches):
        observer.observe(xb)  # type: ignore[operator]  # every observer has observe()


def test_min_max_by_hand() -> None:
    obs = MinMaxObserver()
    assert not obs.seen
    obs.observe(torch.tensor([0.0, 4.0]))
    obs.observe(torch.tensor([-2.0, 1.0]))
    assert obs.seen
    assert [float(v) for v in obs.range()] == [-2.0, 4.0]


def test_moving_average_by_hand() -> None:
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs.observe(torch.tensor([0.0, 4.0]))  # the first batch sets the averages
    obs.observe(torch.tensor([-2.0, 8.0]))  # 0 + 0.5 * (-2 - 0), 4 + 0.5 * (8 - 4)
    assert [float(v) for v in obs.range()] == [-1.0, 6.0]
    assert [float(obs.min_val), float(obs.max_val)] == [-2.0, 8.0]  # raw extremes kept too


@pytest.mark.parametrize("percentile", [99.99, 99.9, 99.0, 90.0])
def test_percentile_matches_numpy(percentile: float) -> None:
    x = _heavy_tailed(50_000)
    obs = PercentileObserver(percentile=percentile)
    _feed(obs, x)
    lo, hi = np.percentile(x.numpy(), [100 - percentile, percentile])
    got = [float(v) for v in obs.range()]
    assert got == pytest.approx([float(lo), float(hi)], rel=1e-6)


def test_percentile_subsamples_beyond_its_budget() -> None:
    x = torch.randn(40_000, generator=torch.Generator().manual_seed(1))
    obs = PercentileObserver(percentile=99.0, max_samples=10_000)
    _feed(obs, x, batches=20)
    lo, hi = np.percentile(x.numpy(), [1.0, 99.0])
    got = [float(v) for v in obs.range()]
    assert got == pytest.approx([float(lo), float(hi)], abs=0.2)  # sampling error


@pytest.mark.parametrize("cls", [MseObserver, KlObserver])
def test_clipping_observers_clip_heavy_tails(cls: type) -> None:
    x = _heavy_tailed()
    obs = cls(bits=8)
    _feed(obs, x)
    lo, hi = (float(v) for v in obs.range())
    assert 0 < hi < 0.9 * float(x.max())
    assert float(x.min()) * 0.9 < lo < 0


@pytest.mark.parametrize("cls", [MseObserver, KlObserver])
def test_clipping_observers_keep_a_uniform_range(cls: type) -> None:
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(2)) * 2 - 1
    obs = cls(bits=8)
    _feed(obs, x)
    lo, hi = (float(v) for v in obs.range())
    assert hi >= 0.95 * float(x.max())
    assert lo <= 0.95 * float(x.min())


def test_kl_on_one_signed_data_uses_all_levels() -> None:
    x = _heavy_tailed().abs()
    obs = KlObserver(bits=8)
    _feed(obs, x)
    lo, hi = (float(v) for v in obs.range())
    assert lo >= 0 and 0 < hi < float(x.max())


def test_kl_threshold_on_a_hand_histogram() -> None:
    # 16 bins, 4 levels: a bulk in the first 4 bins and one far outlier
    hist = np.array([100, 80, 60, 40] + [0] * 11 + [1], dtype=float)
    kept = kl_threshold_bin(hist, 4)
    assert 4 <= kept < 16
    # with no tail at all the first `levels` bins already represent it exactly
    assert kl_threshold_bin(np.array([5, 3, 2, 1, 0, 0, 0, 0], dtype=float), 4) == 4


def test_histogram_grows_without_losing_counts() -> None:
    obs = MseObserver(bins=64)
    obs.observe(torch.linspace(-1, 1, 1000))
    obs.observe(torch.tensor([37.0]))  # the range doubles six times
    assert obs.bound == 64.0
    assert float(obs.hist.sum()) == 1001


# ---- configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", OBSERVERS)
def test_observer_by_name(name: str) -> None:
    config = CHOICE.validate_python(name)
    assert config.name == name  # type: ignore[attr-defined]  # every choice has a name
    assert config.build(8).bits == 8  # type: ignore[attr-defined]  # and builds an observer


def test_observer_options_are_typed() -> None:
    config = CHOICE.validate_python({"name": "percentile", "percentile": 99.9})
    assert config == PercentileConfig(percentile=99.9)
    assert CHOICE.validate_python({"name": "kl", "bins": 1024}) == KlConfig(bins=1024)
    with pytest.raises(ValidationError, match="Extra inputs"):
        CHOICE.validate_python({"name": "percentile", "bins": 8})
    with pytest.raises(ValidationError, match="less than or equal to 100"):
        CHOICE.validate_python({"name": "percentile", "percentile": 120})
    with pytest.raises(ValidationError, match="'minmax', 'moving_average', 'percentile'"):
        CHOICE.validate_python("entropy")


def test_ptq_config_takes_an_observer() -> None:
    assert PtqMethod.Config().observer.name == "minmax"
    config = PtqMethod.Config.model_validate({"observer": "kl"})
    assert config.observer == KlConfig()
    with pytest.raises(ValidationError):
        PtqMethod.Config.model_validate({"observer": {"name": "mse", "steps": 0}})


@pytest.mark.parametrize("name", OBSERVERS)
def test_ptq_runs_with_every_observer(name: str) -> None:
    torch.manual_seed(0)
    model = Mlp(MlpConfig(hidden=(32,))).eval()
    calib = torch.randn(64, 28, 28, generator=torch.Generator().manual_seed(1))
    method = PtqMethod(PtqMethod.Config.model_validate({"observer": name}), BitWidth.parse("w8a8"))
    candidate = method.prepare(copy.deepcopy(model))

    def forward_loop(m: torch.nn.Module) -> None:
        for xb in calib.split(16):
            m(xb)

    converted = method.convert(method.calibrate(candidate, forward_loop)).eval()
    with torch.inference_mode():
        out, ref = converted(calib[:8]), model(calib[:8])
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < 0.2
