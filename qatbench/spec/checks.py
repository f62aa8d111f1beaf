"""The checks of a parsed experiment against what is registered, and its model factories.

:func:`check_names_and_capabilities` runs after the schema has validated: every model is
registered or has an importable factory, every method is registered and its options pass
its own ``Config``, per-method bit-widths and the top-level ``bits`` and ``runtimes`` are
ones each method can do, ``exclude`` rules name values of the grid, and every ``expect``
line parses. Each failure is one :class:`ConfigError` naming the file and the key.
:func:`resolve_model_factory` gives the callable that builds a model entry's model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from qatbench import registry
from qatbench.errors import ConfigError, UnknownNameError
from qatbench.quant.bitwidth import BitWidth
from qatbench.spec.errors import describe_validation_error
from qatbench.spec.expectations import parse_expectation

if TYPE_CHECKING:
    from qatbench.spec.schema import ExperimentSpec, ModelEntry


def check_names_and_capabilities(spec: ExperimentSpec, source: str) -> None:
    """Names, method options, capabilities, exclusions and expectations of ``spec``; the
    first problem is a ConfigError naming ``source`` and the key."""
    for i, model in enumerate(spec.models):
        where = f"{source}: models[{i}].name"
        if model.factory:
            _resolve_factory(model.factory, f"{source}: models[{i}].factory")
        elif model.name not in registry.models:
            raise UnknownNameError("model", model.name, registry.models.names(), where=where)
    for i, method in enumerate(spec.methods):
        where = f"{source}: methods[{i}]"
        cls = registry.methods.get(method.name, where=f"{where}.name")
        try:
            # The trials' bits and runtimes, for options valid only with some (a method's
            # own check, e.g. a weight layout that has no torch kernel).
            grid = {"bits": method.bits or spec.bits, "runtimes": spec.runtimes}
            cls.Config.model_validate(method.options, context=grid)
        except ValidationError as exc:
            raise ConfigError(
                f"{where}.options.{describe_validation_error(exc, cls.Config)}"
            ) from None
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
        if not any(r in caps.runtimes for r in spec.runtimes):
            raise ConfigError(
                f"{source}: runtimes: method {method.name!r} runs on none of {spec.runtimes}; "
                f"allowed: {', '.join(sorted(caps.runtimes))}"
            )
    axes: dict[str, list[str]] = {
        "model": [m.name for m in spec.models],
        "method": [m.name for m in spec.methods],
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


def _expect_lists(spec: ExperimentSpec) -> list[tuple[str, list[str]]]:
    lists = [("expect", spec.expect)]
    lists += [(f"models[{i}].expect", m.expect) for i, m in enumerate(spec.models)]
    lists += [(f"methods[{i}].expect", m.expect) for i, m in enumerate(spec.methods)]
    return lists


def _resolve_factory(target: str, where: str) -> Any:
    """Import ``package.module:function``. This runs the user's own code, by design."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any import failure is their error
        raise ConfigError(
            f"{where}: cannot import {module_name!r}: {exc}".splitlines()[0]
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{where}: {module_name!r} has no callable {attr!r}")
    return factory


def resolve_model_factory(entry: ModelEntry) -> Any:
    """The callable that builds ``entry``'s model: a registered model or a user factory."""
    if entry.factory:
        return _resolve_factory(entry.factory, f"model {entry.name}")
    return registry.models.get(entry.name)
