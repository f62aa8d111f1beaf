"""The text train loop: steps per epoch, the pretraining schedule, its cache key, and QAT's
``epochs`` option measured in the loop's steps."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from qatbench.data import training
from qatbench.data.text import load_text
from qatbench.data.training import (
    RECIPES,
    Recipe,
    TrainLoop,
    learning_rate,
    pretrained,
    train_loop,
)
from qatbench.errors import PluginError
from qatbench.methods.qat import QatMethod
from qatbench.models.gpt import build_gpt_tiny
from qatbench.quant.bitwidth import BitWidth

SEQ = 32
EXAMPLE = torch.zeros(1, SEQ, dtype=torch.long)


@pytest.fixture(scope="module")
def text():
    return load_text(SEQ, 8, 8, EXAMPLE, seed=0)


def _small(data, n: int = 64):
    """The same splits with only ``n`` training sequences, so an epoch is a few steps."""
    from dataclasses import replace

    return replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])


def _count_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    seen = [0]
    optimizer.register_step_post_hook(lambda *_: seen.__setitem__(0, seen[0] + 1))
    return seen


def test_steps_per_epoch_is_a_pass_over_the_training_sequences(text) -> None:
    loop = train_loop(text, 16, seed=0)
    assert loop.steps_per_epoch == math.ceil(len(text.train_x) / 16)
    assert train_loop(_small(text, 33), 16, seed=0).steps_per_epoch == 3


def test_the_loop_takes_exactly_the_steps_asked_across_epochs(text) -> None:
    model, _ = build_gpt_tiny(context=SEQ)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = _count_steps(optimizer)
    train_loop(_small(text), 16, seed=0)(model, optimizer, 10)  # 4 steps an epoch
    assert seen[0] == 10 and not model.training


@pytest.mark.parametrize(("epochs", "steps"), [(1.0, 4), (2.5, 10), (0.1, 1)])
def test_qat_epochs_are_counted_in_the_loop_steps(text, epochs: float, steps: int) -> None:
    method = QatMethod(QatMethod.Config(epochs=epochs, lr=1e-4), BitWidth.parse("w8a8"))
    model, _ = build_gpt_tiny(context=SEQ)
    loop = train_loop(_small(text), 16, seed=0)
    assert method._steps(loop) == steps
    optimizers: list[int] = []
    real = method._optimizer

    def counting(m: torch.nn.Module) -> torch.optim.Optimizer:
        opt = real(m)
        optimizers.append(0)
        opt.register_step_post_hook(lambda *_: optimizers.__setitem__(-1, optimizers[-1] + 1))
        return opt

    method._optimizer = counting  # type: ignore[method-assign]  # count the real steps
    method.train(model, loop)
    assert optimizers == [steps]


def test_qat_epochs_without_a_known_epoch_length_is_a_plugin_error() -> None:
    method = QatMethod(QatMethod.Config(epochs=1), BitWidth.parse("w8a8"))
    with pytest.raises(PluginError, match="steps_per_epoch"):
        method._steps(lambda model, optimizer, steps: None)


def test_cosine_schedule_warms_up_then_decays_to_its_floor() -> None:
    recipe = Recipe(lr=1e-2, schedule="cosine", warmup_fraction=0.1, final_lr_fraction=0.05)
    lrs = [learning_rate(recipe, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-2)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))  # warm-up rises
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # then decays
    assert lrs[-1] == pytest.approx(5e-4, rel=0.01)
    assert learning_rate(Recipe(lr=3e-3), 50, 100) == 3e-3  # constant


def test_the_loop_applies_its_recipe_per_step(text) -> None:
    recipe = Recipe(lr=1e-2, schedule="cosine", final_lr_fraction=0.0)
    model, _ = build_gpt_tiny(context=SEQ)
    optimizer = torch.optim.SGD(model.parameters(), lr=99.0)
    seen: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    TrainLoop(_small(text), 16, 0, recipe)(model, optimizer, 8)
    assert seen[0] == pytest.approx(1e-2) and seen[-1] < 1e-3 and 99.0 not in seen


def test_language_models_pretrain_with_their_recipe_and_cache_it(
    text, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QATBENCH_CACHE", str(tmp_path))
    data = _small(text)
    key = {"model": "gpt_tiny", "data": data.name, "epochs": 1, "seed": 0}
    torch.manual_seed(0)
    model, hit = pretrained(build_gpt_tiny(context=SEQ)[0], key, data, 1, 16, 0)
    assert not hit and len(list(tmp_path.glob("*.pt"))) == 1
    again, hit = pretrained(build_gpt_tiny(context=SEQ)[0], key, data, 1, 16, 0)
    assert hit
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a changed recipe is a different cache entry, never stale weights
    changed = {**RECIPES, "language_modelling": Recipe(lr=1e-4, schedule="cosine")}
    monkeypatch.setattr(training, "RECIPES", changed)
    _, hit = pretrained(build_gpt_tiny(context=SEQ)[0], key, data, 1, 16, 0)
    assert not hit and len(list(tmp_path.glob("*.pt"))) == 2


@pytest.mark.parametrize(
    ("name", "options", "bits"), [("gptq", {"group_size": 32}, "w4"), ("smoothquant", {}, "w8a8")]
)
def test_calibration_on_a_tied_lm_head_leaves_the_token_embedding_alone(
    text, name: str, options: dict[str, int], bits: str
) -> None:
    """gptq writes quantized weights, smoothquant scales them: into the head, not wte."""
    from qatbench import registry
    from qatbench.data.training import forward_loop

    cls = registry.methods.get(name)
    method = cls(cls.Config(**options), BitWidth.parse(bits))
    torch.manual_seed(0)
    model, _ = build_gpt_tiny(context=SEQ)
    assert model.lm_head.weight is model.wte.weight  # tied, as gpt presets are
    embedding = model.wte.weight.detach().clone()
    model = method.calibrate(method.prepare(model), forward_loop(text, 8))
    assert torch.equal(model.wte.weight, embedding)
    if name == "gptq":  # smoothquant's head is wrapped until convert
        assert not torch.equal(model.lm_head.weight, embedding)  # the head holds its integers
