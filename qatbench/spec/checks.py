"""The checks of a parsed experiment against what is registered, and its model factories.

:func:`check_names_and_capabilities` runs after the schema has validated: every model is
registered or has an importable factory, every method is registered and its options pass
its own ``Config``, every method and runtime can run here (its optional extra is
installed), per-method bit-widths and the top-level ``bits`` and ``runtimes`` are
ones each method can do, ``exclude`` rules name values of the grid, and every ``expect``
line parses. Each failure is one :class:`ConfigError` naming the file and the key.
:func:`resolve_model_factory` gives the callable that builds a model entry's model.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from qatbench import registry
from qatbench.errors import ConfigError, UnknownNameError
from qatbench.quant.bitwidth import BitWidth
from qatbench.spec.errors import describe_validation_error
from qatbench.spec.expectations import parse_expectation
from qatbench.user_code import resolve_factory

if TYPE_CHECKING:
    from qatbench.spec.schema import ExperimentSpec, ModelEntry, TaskEntry


def check_names_and_capabilities(spec: ExperimentSpec, source: str) -> None:
    """Names, method options, capabilities, exclusions and expectations of ``spec``; the
    first problem is a ConfigError naming ``source`` and the key."""
    for i, model in enumerate(spec.models):
        where = f"{source}: models[{i}].name"
        if model.factory:
            resolve_factory(model.factory, f"{source}: models[{i}].factory")
        elif model.name not in registry.models:
            raise UnknownNameError("model", model.name, registry.models.names(), where=where)
    runtimes = {
        name: registry.runtimes.get(name, where=f"{source}: runtimes[{i}]")
        for i, name in enumerate(spec.runtimes)
    }
    for i, (name, runtime) in enumerate(runtimes.items()):
        reason = runtime.unavailable_reason()
        if reason:  # an optional extra that is not installed: known before anything runs
            raise ConfigError(
                f"{source}: runtimes[{i}]: runtime {name!r} cannot run here: {reason}"
            )
    for i, method in enumerate(spec.methods):
        where = f"{source}: methods[{i}]"
        cls = registry.methods.get(method.name, where=f"{where}.name")
        unavailable = getattr(cls, "unavailable_reason", None)
        if unavailable is not None and unavailable():
            raise ConfigError(
                f"{where}.name: method {method.name!r} cannot run here: {unavailable()}"
            )
        # The trials' bits and runtimes, for options valid only with some (a method's own
        # check, e.g. a weight layout that has no torch kernel).
        grid = {"bits": method.bits or spec.bits, "runtimes": spec.runtimes}
        for variant in method.variants():
            try:
                cls.Config.model_validate(variant.options, context=grid)
            except ValidationError as exc:
                raise ConfigError(
                    f"{where}.options.{describe_validation_error(exc, cls.Config)}"
                ) from None
            if variant.options.get("keep_fp32") == "auto" and not spec.budget:
                raise ConfigError(
                    f"{where}.options.keep_fp32: 'auto' keeps the fewest layers in fp32 that "
                    "meet the experiment's budget, and there is none: add one, e.g. "
                    "budget: {accuracy_delta_vs_fp32: -1.0}"
                )
        caps = cls.capabilities
        own_bits = method.bits is not None
        for j, label in enumerate(method.bits or []):
            try:
                bits = BitWidth.parse(label)
            except ValueError as exc:
                raise ConfigError(f"{where}.bits[{j}]: {exc}") from None
            if not caps.accepts(bits):
                raise ConfigError(
                    f"{where}.bits[{j}]: method {method.name!r} cannot do {label!r}; "
                    f"allowed: {', '.join(caps.allowed_bits())}"
                )
        if (
            caps.quantizes
            and not own_bits
            and not any(caps.accepts(BitWidth.parse(b)) for b in spec.bits)
        ):
            raise ConfigError(
                f"{source}: bits: method {method.name!r} can do none of {spec.bits}; "
                f"allowed: {', '.join(caps.allowed_bits())}"
            )
        if not any(caps.runs_on(r.capabilities) for r in runtimes.values()):
            able = [n for n in registry.runtimes.names() if caps.runs_on(_caps_of(n))]
            raise ConfigError(
                f"{source}: runtimes: method {method.name!r} runs on none of {spec.runtimes}; "
                f"allowed: {', '.join(able)}"
            )
    _check_top_level_bits(spec, source)
    own_task = resolve_task(spec.task, f"{source}: task") if spec.task is not None else None
    _check_budget(spec.budget, source, own_task)
    _check_tracking_uri(spec.tracking.uri, source)
    if spec.data.factory:
        resolve_factory(spec.data.factory, f"{source}: data.factory")
    _check_models_fit_data(spec, source)
    axes: dict[str, list[str]] = {
        "model": sorted({n for m in spec.models for n in (m.name, m.key)}),
        "method": sorted({n for m in spec.methods for v in m.variants() for n in (v.name, v.key)}),
        "bits": sorted({"fp32", *spec.bits, *(b for m in spec.methods for b in m.bits or [])}),
        "runtime": list(spec.runtimes),
    }
    for i, rule in enumerate(spec.exclude):
        if not rule:
            raise ConfigError(f"{source}: exclude[{i}]: an empty rule would exclude everything")
        for key, value in rule.items():
            if value not in axes[key]:
                raise ConfigError(
                    f"{source}: exclude[{i}].{key}: {value!r} matches nothing; "
                    f"allowed: {', '.join(axes[key])}"
                )
    for where, items in _expect_lists(spec):
        for j, text in enumerate(items):
            try:
                parse_expectation(text)
            except ValueError as exc:
                raise ConfigError(f"{source}: {where}[{j}]: {exc}") from None


def _caps_of(runtime: str) -> Any:
    return registry.runtimes.get(runtime).capabilities


def _check_budget(budget: dict[str, float], source: str, own_task: Any = None) -> None:
    """Every key of ``budget`` is a quality metric whose direction is known, every bound a
    finite number."""
    from qatbench.data.tasks import task_directions
    from qatbench.measure.directions import quality_metrics

    known = quality_metrics(task_directions(*([own_task] if own_task is not None else [])))
    for key, bound in budget.items():
        if key not in known:
            raise ConfigError(
                f"{source}: budget.{key}: not a quality metric a budget can bound; "
                f"allowed: {', '.join(sorted(known))}"
            )
        if not math.isfinite(bound):
            raise ConfigError(f"{source}: budget.{key}: {bound!r} is not a finite number")


def _check_top_level_bits(spec: ExperimentSpec, source: str) -> None:
    """Every bit-width of ``bits`` is one some quantizing method of the grid can do: a label
    no method takes would otherwise vanish from the grid without a word."""
    takers = [
        registry.methods.get(m.name).capabilities
        for m in spec.methods
        if m.bits is None and registry.methods.get(m.name).capabilities.quantizes
    ]
    if not takers:
        return  # no method reads the top-level bits (fp32, casts, or each has its own)
    for j, label in enumerate(spec.bits):
        if not any(caps.accepts(BitWidth.parse(label)) for caps in takers):
            allowed = sorted({b for caps in takers for b in caps.allowed_bits()})
            raise ConfigError(
                f"{source}: bits[{j}]: no method of the grid can do {label!r}; "
                f"allowed: {', '.join(allowed)}"
            )


# MLflow stores qatbench can log to; a plain path or file: is MLflow's file store, which
# MLflow refuses unless MLFLOW_ALLOW_FILE_STORE is set.
_STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def _check_tracking_uri(uri: str | None, source: str) -> None:
    if uri is None:
        return
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme in _STORE_SCHEMES:
        return
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in (
        "1",
        "true",
    ):
        return
    what = (
        "MLflow's file store, which MLflow refuses unless MLFLOW_ALLOW_FILE_STORE is set"
        if scheme in ("", "file")
        else "not a store qatbench can log to"
    )
    raise ConfigError(
        f"{source}: tracking.uri: {uri!r} is {what}; use sqlite:///PATH/mlflow.db, "
        "an http(s):// tracking server or a database URI"
    )


def _check_models_fit_data(spec: ExperimentSpec, source: str) -> None:
    """Each model's example input fits the dataset, known before anything is trained: the
    model is built on PyTorch's meta device (shapes and dtypes, no memory, no weights), so
    the check costs little even for a large language model."""
    if spec.data.dataset == "synthetic" or spec.data.factory:
        return  # shaped like the example by construction; a factory is checked when run
    from qatbench.data.datasets import input_problem

    for i, entry in enumerate(spec.models):
        example = _meta_example(entry)
        problem = None if example is None else input_problem(spec.data, example)
        if problem:
            raise ConfigError(f"{source}: models[{i}] ({entry.name}): {problem}")


def _meta_example(entry: ModelEntry) -> Any:
    """The first example input of ``entry``'s model built on the meta device, or None where
    the factory cannot build there (the trial's build phase then reports what it can)."""
    import torch

    from qatbench.data.inputs import from_example

    try:
        with torch.device("meta"):
            _model, example = resolve_model_factory(entry)(**entry.options)
        batch, _names = from_example(example, entry.key)
    except Exception:  # the user's factory on an unusual device: no verdict, not an error
        return None
    return batch


def _expect_lists(spec: ExperimentSpec) -> list[tuple[str, list[str]]]:
    lists = [("expect", spec.expect)]
    lists += [(f"models[{i}].expect", m.expect) for i, m in enumerate(spec.models)]
    lists += [(f"methods[{i}].expect", m.expect) for i, m in enumerate(spec.methods)]
    return lists


def resolve_task(entry: TaskEntry, where: str = "task") -> Any:
    """The :class:`~qatbench.data.tasks.Task` an experiment's ``task:`` names."""
    from qatbench.data.tasks import Task

    if entry.name is not None:
        return registry.tasks.get(entry.name, where=f"{where}.name")
    assert entry.factory is not None  # TaskEntry holds exactly one of the two
    found = resolve_factory(entry.factory, f"{where}.factory")
    task = found() if isinstance(found, type) and issubclass(found, Task) else found
    if not isinstance(task, Task):
        raise ConfigError(f"{where}.factory: {entry.factory!r} is not a qatbench Task")
    return task


def resolve_model_factory(entry: ModelEntry) -> Any:
    """The callable that builds ``entry``'s model: a registered model or a user factory."""
    if entry.factory:
        return resolve_factory(entry.factory, f"model {entry.name}")
    return registry.models.get(entry.name)
