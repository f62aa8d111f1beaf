"""``keep_fp32: auto``: the fewest most sensitive layers in fp32 within the experiment's
budget, searched on held-out calibration data, recorded in the trial (issue 25)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from qatbench.errors import ConfigError, PluginError
from qatbench.report.flags import trial_flags
from qatbench.results import TrialResult
from qatbench.spec.schema import validate_experiment
from qatbench.trial.lifecycle import run_trial


def _experiment(budget: dict[str, float] | None, keep: Any = "auto") -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "auto",
        "models": [{"name": "mlp", "options": {"hidden": [128, 64]}}],
        "methods": [{"name": "ptq", "bits": ["w2a8"], "options": {"keep_fp32": keep}}],
        "runtimes": ["torch"],
        "data": {
            "dataset": "digits",
            "pretrain_epochs": 8,
            "eval_samples": 256,
            "calibration_samples": 256,
        },
        "measure": {"batch_sizes": [1], "max_time_s": 0.05, "min_rounds": 5, "threads": 1},
    }
    if budget is not None:
        doc["budget"] = budget
    return doc


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TrialResult]]:
    """The same w2a8 MLP trial with a budget it can meet by keeping layers, and with one no
    configuration can meet (the quantized model may not beat fp32 by 5 points)."""
    out = tmp_path_factory.mktemp("auto")
    results = {}
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QATBENCH_CACHE", str(out / "cache"))
        try:
            for name, budget in (("reachable", -5.0), ("impossible", 5.0)):
                spec = validate_experiment(
                    _experiment({"accuracy_delta_vs_fp32": budget}), source="auto.yaml"
                )
                (trial,) = spec.expand()
                results[name] = run_trial(trial, out / name)
        finally:
            torch.set_num_threads(threads)
    yield results


def test_auto_keeps_the_most_sensitive_layers_that_bring_the_model_within_budget(
    trials: dict[str, TrialResult],
) -> None:
    trial = trials["reachable"]
    assert trial.ok, trial.error
    search = trial.details["keep_fp32_search"]
    kept = trial.details["kept_fp32_layers"]
    ranking = search["ranking"]
    assert sorted(ranking) == ["net.1", "net.3", "net.5"]  # every quantized layer, ranked
    assert 0 < len(kept) < len(ranking) and kept == ranking[: len(kept)]  # worst first
    assert search["validation"]["accuracy_delta_vs_fp32"] >= -5.0  # met where it searched
    assert trial.metrics["budget_met"] == 1.0 and search["misses"] == []
    assert trial.metrics["kept_fp32_layers"] == len(kept)
    assert trial.metrics["keep_fp32_candidates"] >= 2  # the plain w2a8 failed first
    assert trial.metrics["keep_fp32_search_s"] > 0 and trial.phases["search_s"] > 0
    assert "budget" not in {f.key for f in trial_flags(trial)}
    # the measured model is the mixed one: the kept layers are bigger than 2-bit ones
    assert trial.metrics["compression_ratio"] < 14


def test_no_configuration_within_budget_finishes_with_the_closest_and_a_flag(
    trials: dict[str, TrialResult],
) -> None:
    trial = trials["impossible"]
    assert trial.ok, trial.error  # the trial still measures what it found
    assert trial.metrics["budget_met"] == 0.0
    assert trial.details["keep_fp32_search"]["misses"]
    assert any("no configuration within budget" in w for w in trial.details.get("warnings", []))
    (flag,) = [f for f in trial_flags(trial) if f.key == "budget"]
    assert "accuracy_delta_vs_fp32 >= 5" in flag.title


def test_auto_without_a_budget_is_one_line_at_validate() -> None:
    with pytest.raises(ConfigError) as info:
        validate_experiment(_experiment(None), source="auto.yaml")
    text = str(info.value)
    assert text.startswith("auto.yaml: methods[0].options.keep_fp32: 'auto'") and "budget" in text
    assert "\n" not in text


def test_a_method_handed_auto_outside_a_trial_says_who_resolves_it() -> None:
    from qatbench import registry
    from qatbench.methods.lifecycle import quantize_copy
    from qatbench.quant.bitwidth import BitWidth

    cls = registry.methods.get("ptq")
    method = cls(cls.Config.model_validate({"keep_fp32": "auto"}), BitWidth.parse("w8a8"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))

    def loop() -> Any:
        return lambda m: m(torch.randn(2, 4))

    with pytest.raises(PluginError, match="resolved by the trial"):
        quantize_copy(method, model, forward_loop=loop, train_loop=loop)
