"""Plugin registries (qatbench.registry): direct registration, entry points, broken plugins."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from typing import Any

import pytest
import torch
from pydantic import Field
from typer.testing import CliRunner

import qatbench.registry
from qatbench import registry
from qatbench.cli import app
from qatbench.errors import ConfigError, UnknownNameError
from qatbench.methods.base import Capabilities, MethodConfig, QuantMethod
from qatbench.methods.fp32 import Fp32Method
from qatbench.registry import PluginImportWarning, Registry
from qatbench.spec.schema import validate_experiment

GROUP = "qatbench.test_only_methods"


class ToyRtn(QuantMethod):
    """A throwaway weight-only method, registered directly (as a notebook would)."""

    name = "toy_rtn"
    capabilities = Capabilities(weight_bits=frozenset({3, 5}), weight_only=True)

    class Config(MethodConfig):
        clip: float = Field(1.0, gt=0, le=1)

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


@pytest.fixture
def toy() -> Iterator[type[ToyRtn]]:
    registry.methods.register("toy_rtn", ToyRtn)
    yield ToyRtn
    registry.methods.unregister("toy_rtn")


def broken_entry_point(name: str = "broken") -> EntryPoint:
    return EntryPoint(name=name, value="nonexistent_mod_xyz:Thing", group=GROUP)


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> list[EntryPoint]:
    """The entry points ``qatbench.registry`` sees in GROUP; append to it in a test."""
    points: list[EntryPoint] = []

    def entry_points(*, group: str) -> list[EntryPoint]:
        return [ep for ep in points if ep.group == group]

    monkeypatch.setattr(qatbench.registry, "entry_points", entry_points)
    return points


def method_registry() -> Registry[Any]:
    return Registry("method", GROUP, qatbench.registry._validate_method)


# --- the real method registry -----------------------------------------------------------


def test_builtins_come_from_the_entry_point_group() -> None:
    assert {"fp32", "ptq"} <= set(registry.methods.names())
    assert registry.methods.get("fp32") is Fp32Method
    assert {"mlp", "tiny_transformer"} <= set(registry.models.names())
    assert registry.methods.failed() == {}


def test_a_directly_registered_method_is_listed_and_found(toy: type[ToyRtn]) -> None:
    assert "toy_rtn" in registry.methods.names()
    assert "toy_rtn" in registry.methods
    assert registry.methods.get("toy_rtn") is toy
    assert registry.methods.names() == sorted(registry.methods.names())


def test_unregister_removes_it(toy: type[ToyRtn]) -> None:
    registry.methods.unregister("toy_rtn")
    assert "toy_rtn" not in registry.methods.names()
    with pytest.raises(UnknownNameError):
        registry.methods.get("toy_rtn")
    registry.methods.unregister("toy_rtn")  # unregistering twice is harmless


def test_a_registered_method_is_shown_by_list_methods(toy: type[ToyRtn]) -> None:
    result = CliRunner().invoke(app, ["list", "methods"])
    assert result.exit_code == 0, result.output
    assert "toy_rtn" in result.output
    assert "w3 w5" in result.output
    assert "clip: 1.0" in result.output
    assert "fp32" in result.output and "ptq" in result.output


def test_a_registered_method_can_be_named_in_an_experiment(toy: type[ToyRtn]) -> None:
    spec = validate_experiment(
        {
            "name": "toy",
            "models": ["mlp"],
            "bits": ["w3"],
            "methods": ["fp32", {"name": "toy_rtn", "options": {"clip": 0.5}}],
        }
    )
    assert [t.id for t in spec.expand()] == ["mlp-fp32-fp32-torch", "mlp-toy_rtn-w3-torch"]
    with pytest.raises(ConfigError, match=r"methods\[0\]\.options\.clip"):
        validate_experiment(
            {
                "name": "toy",
                "models": ["mlp"],
                "bits": ["w3"],
                "methods": [{"name": "toy_rtn", "options": {"clip": 2}}],
            }
        )


def test_a_name_mismatch_is_rejected() -> None:
    with pytest.raises(TypeError) as info:
        registry.methods.register("other_name", ToyRtn)
    assert "'toy_rtn'" in str(info.value) and "'other_name'" in str(info.value)
    assert "other_name" not in registry.methods.names()


@pytest.mark.parametrize(
    "obj",
    [object, ToyRtn(), lambda model: model, "qatbench.methods.fp32:Fp32Method", torch.nn.Linear],
    ids=["object", "instance", "function", "string", "module-class"],
)
def test_a_non_quant_method_is_rejected(obj: object) -> None:
    with pytest.raises(TypeError, match="not a QuantMethod subclass"):
        registry.methods.register("toy_rtn", obj)
    assert "toy_rtn" not in registry.methods.names()


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError) as info:
        registry.methods.get("gptq_xyz", where="exp.yaml: methods[0].name")
    message = str(info.value)
    assert message.startswith("exp.yaml: methods[0].name: unknown method 'gptq_xyz'")
    assert "known methods: " in message and "fp32, " in message and ", ptq, " in message
    assert info.value.name == "gptq_xyz"
    assert {"fp32", "ptq"} <= set(info.value.known)


def test_an_unknown_name_lists_directly_registered_ones_too(toy: type[ToyRtn]) -> None:
    with pytest.raises(UnknownNameError, match="toy_rtn"):
        registry.methods.get("toy")


def test_models_registry_rejects_non_callables() -> None:
    with pytest.raises(TypeError, match="not callable"):
        registry.models.register("nonsense_model", 42)
    assert "nonsense_model" not in registry.models.names()


# --- entry points, on a made-up group ------------------------------------------------------


def test_a_plugin_whose_import_raises_is_a_warning_naming_it(
    fake_entry_points: list[EntryPoint],
) -> None:
    fake_entry_points += [
        broken_entry_point(),
        EntryPoint(name="fp32", value="qatbench.methods.fp32:Fp32Method", group=GROUP),
    ]
    plugins = method_registry()
    with pytest.warns(PluginImportWarning) as caught:
        names = plugins.names()
    assert names == ["fp32"]  # the good plugin still loads
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "'broken'" in message
    assert "nonexistent_mod_xyz:Thing" in message
    assert "ModuleNotFoundError" in message
    failed = plugins.failed()
    assert list(failed) == ["broken"]
    assert "nonexistent_mod_xyz" in failed["broken"]
    assert "\n" not in failed["broken"]


def test_a_broken_plugin_warns_once(fake_entry_points: list[EntryPoint]) -> None:
    fake_entry_points.append(broken_entry_point())
    plugins = method_registry()
    with pytest.warns(PluginImportWarning):
        plugins.names()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plugins.names() == []
        assert "broken" not in plugins


def test_naming_a_broken_plugin_says_it_failed_to_load(
    fake_entry_points: list[EntryPoint],
) -> None:
    fake_entry_points.append(broken_entry_point())
    plugins = method_registry()
    with pytest.warns(PluginImportWarning), pytest.raises(ConfigError) as info:
        plugins.get("broken", where="exp.yaml: methods[0].name")
    message = str(info.value)
    assert message.startswith("exp.yaml: methods[0].name: method 'broken' is installed")
    assert "failed to load" in message and "nonexistent_mod_xyz" in message


def test_a_plugin_breaking_the_contract_is_skipped_with_a_warning(
    fake_entry_points: list[EntryPoint],
) -> None:
    fake_entry_points += [
        # the class is called 'fp32' but registered as 'renamed'
        EntryPoint(name="renamed", value="qatbench.methods.fp32:Fp32Method", group=GROUP),
        # importable, but not a QuantMethod
        EntryPoint(name="not_a_method", value="qatbench.errors:ConfigError", group=GROUP),
    ]
    plugins = method_registry()
    with pytest.warns(PluginImportWarning) as caught:
        assert plugins.names() == []
    texts = " ".join(str(w.message) for w in caught)
    assert "'renamed'" in texts and "'not_a_method'" in texts
    assert set(plugins.failed()) == {"renamed", "not_a_method"}


def test_direct_registration_wins_over_an_entry_point(
    fake_entry_points: list[EntryPoint],
) -> None:
    class Replacement(Fp32Method):
        name = "fp32"

    fake_entry_points.append(
        EntryPoint(name="fp32", value="qatbench.methods.fp32:Fp32Method", group=GROUP)
    )
    plugins = method_registry()
    plugins.register("fp32", Replacement)
    assert plugins.get("fp32") is Replacement


def test_reload_reads_entry_points_installed_after_the_first_lookup(
    fake_entry_points: list[EntryPoint],
) -> None:
    plugins = method_registry()
    assert plugins.names() == []
    fake_entry_points.append(
        EntryPoint(name="ptq", value="qatbench.methods.ptq:PtqMethod", group=GROUP)
    )
    assert plugins.names() == []  # read once, lazily
    plugins.reload()
    assert plugins.names() == ["ptq"]


def test_the_real_entry_point_function_reads_our_own_group() -> None:
    # Not monkeypatched: the installed distribution declares the built-ins.
    plugins = method_registry()
    plugins.group = qatbench.registry.METHODS_GROUP
    assert {"fp32", "ptq"} <= set(plugins.names())
