"""Property: whatever a file holds, loading it ends in a valid spec or a ConfigError, a
one-line user error, never another exception (a traceback for the user).

Three generators: arbitrary bytes and text as a file; arbitrary YAML documents (nested
data dumped as YAML); and documents shaped like an experiment, built from the real keys
with values that are sometimes right and often wrong, so validation gets deep.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from qatbench.errors import ConfigError
from qatbench.spec.schema import ExperimentSpec, load_experiment, validate_experiment

SETTINGS = settings(
    max_examples=150,
    deadline=None,  # a shared, loaded CI machine: time is not the property
    database=None,  # no .hypothesis/ folder in the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=25,
)

# pieces of a real experiment; a factory is only ever one of these (import runs code)
FACTORIES = ["qatbench.models.mlp:build_mlp", "no_such_module_xyz:build", "json:loads", "x"]
good_names = st.sampled_from(["mlp", "tiny_transformer", "m1"])
bad_names = st.sampled_from(["../up", "", "a b", "x" * 70, "a/b"]) | st.text(max_size=8)
names = st.sampled_from([True] * 6 + [False]).flatmap(lambda ok: good_names if ok else bad_names)
bit_labels = st.sampled_from(["w8a8", "w4a8", "w8", "w4", "fp32", "w2a8", "w8a4", "w0", "8"])
some = st.one_of(scalars, documents)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the plausible value, sometimes anything at all (many keys per document: each
    must be plausible for validation to get past the first error)."""
    plausible = st.sampled_from([True] * 12 + [False])  # shrinks towards the first: True
    return plausible.flatmap(lambda ok: strategy if ok else some)


model_entries = st.one_of(
    names,
    st.fixed_dictionaries(
        {"name": maybe(names)},
        optional={
            "factory": maybe(st.sampled_from(FACTORIES)),
            "options": maybe(st.fixed_dictionaries({}, optional={"hidden": maybe(st.just([16]))})),
            "expect": maybe(st.lists(st.sampled_from(["mse < 1", "accuracy > 0", "bad"]))),
        },
    ),
)
method_entries = st.one_of(
    st.sampled_from(["fp32", "ptq", "nosuch"]),
    st.fixed_dictionaries(
        {"name": maybe(st.sampled_from(["fp32", "ptq", "nosuch"]))},
        optional={
            "options": maybe(
                st.dictionaries(st.sampled_from(["reduce_range", "nosuch", "per_channel"]), some)
            ),
            "bits": maybe(st.lists(bit_labels, max_size=3)),
        },
    ),
)
sections = {
    "data": st.fixed_dictionaries(
        {},
        optional={
            "dataset": maybe(st.sampled_from(["digits", "synthetic", "text", "imagenet"])),
            "calibration_samples": maybe(st.integers(-5, 10**13)),
            "eval_samples": maybe(st.integers(-5, 10**13)),
            "batch_size": maybe(st.integers(-5, 10**6)),
            "pretrain_epochs": maybe(st.integers(-1, 10**4)),
        },
    ),
    "measure": st.fixed_dictionaries(
        {},
        optional={
            "batch_sizes": maybe(st.lists(st.integers(-2, 10**6), max_size=3)),
            "warmup_s": maybe(st.floats(allow_nan=True, allow_infinity=True)),
            "min_rounds": maybe(st.integers(-1, 10**6)),
            "max_time_s": maybe(st.floats(allow_nan=True, allow_infinity=True)),
            "threads": maybe(st.integers(-1, 4096)),
            "per_layer": some,
        },
    ),
}
experiments = st.fixed_dictionaries(
    {
        "name": maybe(names),
        "models": maybe(st.lists(model_entries, min_size=1, max_size=3)),
        "methods": maybe(st.lists(method_entries, min_size=1, max_size=3)),
    },
    optional={
        "schema_version": maybe(st.just(1)),
        "bits": maybe(st.lists(bit_labels, max_size=3)),
        "runtimes": maybe(st.lists(st.sampled_from(["torch", "onnxruntime", "tvm"]), max_size=3)),
        "exclude": maybe(
            st.lists(
                st.dictionaries(
                    st.sampled_from(["model", "method", "bits", "runtime", "other"]),
                    maybe(st.sampled_from(["mlp", "ptq", "w8a8", "torch"])),
                ),
                max_size=2,
            )
        ),
        "timeout_s": maybe(st.floats(allow_nan=True, allow_infinity=True)),
        "seed": maybe(st.integers(-1, 2**40)),
        "expect": maybe(st.lists(st.sampled_from(["mse < 0.1", "size_bytes <= 5", "??"]))),
        "tracking": maybe(st.fixed_dictionaries({}, optional={"uri": some, "experiment": names})),
        **{key: maybe(value) for key, value in sections.items()},
    },
)


def valid_or_config_error(load: Any, *args: Any) -> None:
    """Run the loader: a spec (which expands to at least one trial) or a ConfigError."""
    try:
        spec = load(*args)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return
    assert isinstance(spec, ExperimentSpec)
    trials = spec.expand()
    assert trials
    assert all(t.id for t in trials)
    assert math.isfinite(spec.timeout_s)


def load_text(payload: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "experiment.yaml"
        path.write_bytes(payload)
        valid_or_config_error(load_experiment, path)


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_a_file(payload: bytes) -> None:
    load_text(payload)


@SETTINGS
@given(st.text(max_size=300))
def test_arbitrary_text_as_a_file(text: str) -> None:
    load_text(text.encode("utf-8", "surrogatepass"))


@SETTINGS
@given(documents)
def test_arbitrary_yaml_documents(document: Any) -> None:
    load_text(yaml.safe_dump(document, allow_unicode=True).encode("utf-8", "surrogatepass"))


@SETTINGS
@given(experiments)
def test_documents_shaped_like_an_experiment(document: dict[str, Any]) -> None:
    valid_or_config_error(validate_experiment, document, "<generated>")
    load_text(yaml.safe_dump(document, allow_unicode=True).encode("utf-8", "surrogatepass"))


@SETTINGS
@given(documents)
def test_arbitrary_nested_data(document: Any) -> None:
    valid_or_config_error(validate_experiment, document, "<generated>")


def test_the_experiment_generator_reaches_valid_experiments() -> None:
    """Not all noise: the generator also draws documents that pass every check."""

    def valid(document: dict[str, Any]) -> bool:
        try:
            return bool(validate_experiment(document, "<generated>").expand())
        except ConfigError:
            return False

    found = find(experiments, valid, settings=settings(database=None, max_examples=2000))
    assert validate_experiment(found, "<found>").expand()
