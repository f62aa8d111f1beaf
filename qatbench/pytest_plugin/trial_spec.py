"""A one-trial experiment from the fixtures' keyword arguments, validated like a YAML file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qatbench.errors import ConfigError

if TYPE_CHECKING:
    from qatbench.spec.schema import ExperimentSpec, TrialSpec

# Keyword settings of qatbench.run() go to the experiment's ``data`` or ``measure`` section.
DATA_KEYS = ("dataset", "calibration_samples", "eval_samples", "batch_size", "pretrain_epochs")
MEASURE_KEYS = (
    "batch_sizes",
    "warmup_s",
    "min_round_s",
    "min_rounds",
    "max_time_s",
    "threads",
    "per_layer",
)


def experiment_spec(
    model: str | dict[str, Any],
    method: str | dict[str, Any],
    bits: str | None,
    runtime: str,
    *,
    experiment: str,
    options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    expect: Sequence[str] = (),
    seed: int = 0,
    timeout_s: float = 900.0,
    source: str = "<qatbench fixture>",
    **settings: Any,
) -> tuple[ExperimentSpec, TrialSpec]:
    """A one-trial experiment, validated like a YAML file, and its trial.

    ``model`` is a registered name, a ``package.module:function`` factory or a mapping as in
    YAML; ``method`` a name or a mapping; ``settings`` are keys of the YAML's ``data`` and
    ``measure`` sections (e.g. ``pretrain_epochs=1, batch_sizes=[1]``).
    """
    from qatbench.spec.schema import validate_experiment

    data = {k: v for k, v in settings.items() if k in DATA_KEYS}
    measure = {k: v for k, v in settings.items() if k in MEASURE_KEYS}
    unknown = sorted(set(settings) - set(data) - set(measure))
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting {unknown[0]!r}; allowed: "
            f"{', '.join(DATA_KEYS + MEASURE_KEYS)}, options, model_options, expect, seed, "
            "timeout_s"
        )
    doc: dict[str, Any] = {
        "name": experiment,
        "models": [_model_entry(model, model_options)],
        "methods": [_method_entry(method, options)],
        "runtimes": [runtime],
        "data": data,
        "measure": measure,
        "seed": seed,
        "timeout_s": timeout_s,
        "expect": list(expect),
    }
    if bits is not None:
        doc["bits"] = [bits]
    spec = validate_experiment(doc, source=source)
    trials = spec.expand()
    if len(trials) != 1:  # validation refuses an empty grid; one of each axis makes one
        raise ConfigError(f"{source}: expected one trial, got {len(trials)}")
    return spec, trials[0]


def _model_entry(model: str | dict[str, Any], options: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any]
    if isinstance(model, dict):
        entry = dict(model)
    elif ":" in model:
        entry = {"name": model.rsplit(":", 1)[1], "factory": model}
    else:
        entry = {"name": model}
    if options:
        entry["options"] = {**entry.get("options", {}), **options}
    return entry


def _method_entry(method: str | dict[str, Any], options: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = dict(method) if isinstance(method, dict) else {"name": method}
    if options:
        entry["options"] = {**entry.get("options", {}), **options}
    return entry
