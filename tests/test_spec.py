"""Experiment files: loading, validation errors and grid expansion (qatbench.spec.schema)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from qatbench.errors import ConfigError, QatbenchError, UnknownNameError
from qatbench.quant.bitwidth import FP32, BitWidth
from qatbench.spec.schema import TrialSpec, load_experiment, validate_experiment

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
INVALID = Path(__file__).resolve().parent / "data" / "invalid"

# file in tests/data/invalid -> fragments its one-line message must contain (the key path,
# the bad value, what is allowed). The file's own path is checked for every case.
INVALID_CASES: dict[str, list[str]] = {
    "misspelt_key.yaml": ["runtims", "unknown key", "runtimes"],
    "unknown_method.yaml": ["methods[1].name", "'gptq_xyz'", "known methods: ", "fp32, "],
    "unsupported_bits.yaml": ["methods[0].bits[0]", "'w4'", "allowed: w2a4,"],
    "unknown_runtime.yaml": ["runtimes[1]", "'tensorrt'", "known runtimes: onnxruntime"],
    "yaml_syntax.yaml": ["invalid YAML", "line 4"],
    "empty.yaml": ["empty", "name, models, methods"],
    "top_level_list.yaml": ["top level", "mapping", "list"],
    "negative_batch.yaml": ["data.batch_size", "(got -4)", "greater than or equal to 1"],
    "zero_rounds.yaml": ["measure.min_rounds", "(got 0)", "greater than or equal to 3"],
    "path_name.yaml": ["name", "'../escape'", "pattern"],
    "schema_99.yaml": ["schema_version", "99", "allowed: 1"],
    "unknown_option.yaml": [
        "methods[1].options.nosuch",
        "unknown key",
        "reduce_range",
        "skip_layers",
    ],
    "bad_expectation.yaml": ["expect[0]", "'accuracy is high'", "<=, >=, <, >, =="],
    "missing.yaml": ["no such experiment file"],  # deliberately not in tests/data/invalid
    # the reliability corpus (CLI runs of each: tests/test_invalid_corpus.py)
    "binary.yaml": ["not a text file"],
    "huge_eval_samples.yaml": ["data.eval_samples", "(got 1000000000000)", "100000"],
    "nan_timing.yaml": ["measure.max_time_s", "(got nan)"],
    "escape_model_name.yaml": ["models[0].name", "'../../etc'", "pattern"],
    "alias_bomb.yaml": ["expands to more than 100000 values"],
    "deep_nesting.yaml": ["invalid YAML", "nested too deeply"],
    "python_tag.yaml": ["invalid YAML", "python/object/apply:os.system"],
    "factory_import_raises.yaml": ["models[0].factory", "cannot import 'data.raising_module'"],
    # the six misses of a held-out corpus (issue 20), each one line naming file and key
    "dup_key.yaml": ["methods", "duplicate key at lines 3 and 5"],
    "typo_hides_required.yaml": ["metods", "did you mean 'methods'?"],
    "unsatisfiable_bits.yaml": ["bits[1]", "'w9a8'", "allowed: w2a4,"],
    "bool_batch.yaml": ["measure.batch_sizes[0]", "(got True)"],
    "input_mismatch.yaml": ["models[0] (linear)", "'digits'", "[1, 4096]"],
    "file_store_uri.yaml": ["tracking.uri", "'file:///tmp/qatbench-file-store'", "sqlite:///"],
}


def experiment(**overrides: Any) -> dict[str, Any]:
    """A small valid experiment document; keyword arguments replace top-level keys."""
    doc: dict[str, Any] = {
        "name": "unit",
        "models": ["mlp"],
        "methods": ["fp32", "ptq"],
        "bits": ["w8a8", "w4a8"],
        "runtimes": ["torch", "onnxruntime"],
    }
    doc.update(overrides)
    return doc


def ids(doc: dict[str, Any]) -> list[str]:
    return [t.id for t in validate_experiment(doc).expand()]


def config_error(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        validate_experiment(doc, source="exp.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("exp.yaml: ")
    return message


# --- the shipped quick start -----------------------------------------------------------


def test_quickstart_validates_and_expands_to_twelve_trials() -> None:
    spec = load_experiment(QUICKSTART)
    trials = spec.expand()
    assert spec.name == "quickstart"
    assert len(trials) == 12
    assert len({t.id for t in trials}) == 12
    for trial in trials:
        assert trial.id == f"{trial.model.name}-{trial.method.name}-{trial.bits}-{trial.runtime}"
        assert re.fullmatch(
            r"[A-Za-z0-9_.]+-[a-z0-9_]+-(fp32|w\d+(a\d+)?)-(torch|onnxruntime)", trial.id
        )
    assert "mlp-ptq-w4a8-onnxruntime" in {t.id for t in trials}
    # the method options reached the trial, already validated
    ptq = next(t for t in trials if t.method.name == "ptq")
    assert ptq.method.options == {"reduce_range": True}


def test_quickstart_fp32_runs_once_per_model_and_runtime() -> None:
    trials = load_experiment(QUICKSTART).expand()
    fp32 = [t for t in trials if t.method.name == "fp32"]
    assert sorted((t.model.name, t.runtime) for t in fp32) == sorted(
        (m, r) for m in ("mlp", "tiny_transformer") for r in ("torch", "onnxruntime")
    )
    assert {t.bits for t in fp32} == {"fp32"}
    ptq_bits = {t.bits for t in trials if t.method.name == "ptq"}
    assert ptq_bits == {"w8a8", "w4a8"}


def test_quickstart_experiment_expectation_applies_to_every_trial() -> None:
    for trial in load_experiment(QUICKSTART).expand():
        assert [str(e) for e in trial.expectations()] == ["accuracy_delta_vs_fp32 > -5"]


def test_trial_spec_is_plain_picklable_data() -> None:
    trial = load_experiment(QUICKSTART).expand()[3]
    copy = pickle.loads(pickle.dumps(trial))
    assert isinstance(copy, TrialSpec)
    assert copy == trial
    assert copy.id == trial.id


# --- expansion ----------------------------------------------------------------------------


def test_defaults_give_one_torch_w8a8_grid() -> None:
    spec = validate_experiment({"name": "d", "models": ["mlp"], "methods": ["fp32", "ptq"]})
    assert spec.bits == ["w8a8"]
    assert spec.runtimes == ["torch"]
    assert [t.id for t in spec.expand()] == ["mlp-fp32-fp32-torch", "mlp-ptq-w8a8-torch"]


def test_exclude_rule_with_several_keys_removes_only_matching_trials() -> None:
    rule = {"method": "ptq", "bits": "w4a8", "runtime": "onnxruntime"}
    got = ids(experiment(exclude=[rule]))
    assert len(got) == 5
    assert "mlp-ptq-w4a8-onnxruntime" not in got
    assert "mlp-ptq-w4a8-torch" in got
    assert "mlp-ptq-w8a8-onnxruntime" in got


def test_exclude_rules_are_or_ed() -> None:
    got = ids(
        experiment(
            models=["mlp", "tiny_transformer"],
            exclude=[{"model": "tiny_transformer"}, {"runtime": "onnxruntime"}],
        )
    )
    assert got == ["mlp-fp32-fp32-torch", "mlp-ptq-w8a8-torch", "mlp-ptq-w4a8-torch"]


def test_exclude_can_remove_the_fp32_baseline() -> None:
    got = ids(experiment(exclude=[{"method": "fp32", "runtime": "torch"}]))
    assert "mlp-fp32-fp32-torch" not in got
    assert "mlp-fp32-fp32-onnxruntime" in got


def test_exclude_with_an_unknown_axis_is_rejected() -> None:
    message = config_error(experiment(exclude=[{"device": "cpu"}]))
    assert "exclude[0]" in message
    assert "'device'" in message
    assert "'model', 'method', 'bits' or 'runtime'" in message


def test_an_empty_exclude_rule_is_rejected() -> None:
    assert "exclude[0]: an empty rule" in config_error(experiment(exclude=[{}]))


def test_a_grid_emptied_by_exclusions_is_rejected() -> None:
    message = config_error(experiment(exclude=[{"method": "fp32"}, {"method": "ptq"}]))
    assert "grid is empty" in message


def test_exclude_naming_a_value_outside_the_grid_is_rejected() -> None:
    # A typo in an exclusion ('onnxrt') silently excludes nothing and the trial runs anyway.
    message = config_error(experiment(exclude=[{"runtime": "onnxrt"}]))
    assert "exclude[0]" in message
    assert "'onnxrt'" in message
    assert "torch" in message and "onnxruntime" in message


def test_per_method_bits_override_the_top_level_bits() -> None:
    got = ids(
        experiment(
            methods=["fp32", {"name": "ptq", "bits": ["w4a8"]}], bits=["w8a8"], runtimes=["torch"]
        )
    )
    assert got == ["mlp-fp32-fp32-torch", "mlp-ptq-w4a8-torch"]


def test_per_method_bits_may_name_what_the_top_level_cannot() -> None:
    # top-level bits are w4 only (weight-only), which ptq cannot do; its own list can.
    doc = experiment(
        methods=["fp32", {"name": "ptq", "bits": ["w8a8"]}], bits=["w4"], runtimes=["torch"]
    )
    assert ids(doc) == ["mlp-fp32-fp32-torch", "mlp-ptq-w8a8-torch"]


def test_top_level_bits_a_method_cannot_do_are_skipped_for_it() -> None:
    # fp32 ignores bits; ptq does w8a8 but not the weight-only w8, which rtn does.
    got = ids(experiment(methods=["fp32", "ptq", "rtn"], bits=["w8", "w8a8"], runtimes=["torch"]))
    assert got == ["mlp-fp32-fp32-torch", "mlp-ptq-w8a8-torch", "mlp-rtn-w8-torch"]


def test_top_level_bits_no_method_can_do_are_rejected() -> None:
    message = config_error(experiment(bits=["w8", "w8a8"], runtimes=["torch"]))
    assert "bits[0]: no method of the grid can do 'w8'; allowed: w2a4," in message


def test_a_method_that_can_do_none_of_the_top_level_bits_is_rejected() -> None:
    message = config_error(experiment(methods=["ptq"], bits=["w4"]))
    assert "bits: method 'ptq' can do none of ['w4']" in message
    assert "allowed: w2a4, w2a8" in message


def test_fp32_with_quantized_bits_of_its_own_is_rejected() -> None:
    message = config_error(experiment(methods=[{"name": "fp32", "bits": ["w8a8"]}]))
    assert "methods[0].bits[0]" in message
    assert "allowed: fp32" in message


def test_top_level_bit_labels_are_normalised() -> None:
    spec = validate_experiment(experiment(bits=["w08a8"], runtimes=["torch"]))
    assert spec.bits == ["w8a8"]
    assert "mlp-ptq-w8a8-torch" in [t.id for t in spec.expand()]


def test_per_method_bit_labels_are_normalised_like_the_top_level() -> None:
    # The trial id is the MLflow run name and the report key: 'w08a8' and 'w8a8' must
    # not become two names for one bit-width (nor escape an exclude rule on 'w8a8').
    got = ids(experiment(methods=[{"name": "ptq", "bits": ["w08a8"]}], runtimes=["torch"]))
    assert got == ["mlp-ptq-w8a8-torch"]


def test_trial_ids_are_unique_or_the_file_is_rejected() -> None:
    # Two trials with one id would share an MLflow run name, a report row and a folder.
    doc = experiment(runtimes=["torch", "torch"], bits=["w8a8", "w8a8"])
    try:
        got = ids(doc)
    except ConfigError as exc:
        assert "torch" in str(exc) or "w8a8" in str(exc)
    else:
        assert len(got) == len(set(got)), f"duplicate trial ids: {got}"


def test_expectations_collect_from_experiment_model_and_method() -> None:
    doc = experiment(
        models=[{"name": "mlp", "expect": ["accuracy > 50"]}],
        methods=["fp32", {"name": "ptq", "expect": ["mse < 0.1"]}],
        expect=["compression_ratio >= 1"],
        runtimes=["torch"],
        bits=["w8a8"],
    )
    by_id = {t.id: [str(e) for e in t.expectations()] for t in validate_experiment(doc).expand()}
    assert by_id == {
        "mlp-fp32-fp32-torch": ["compression_ratio >= 1", "accuracy > 50"],
        "mlp-ptq-w8a8-torch": ["compression_ratio >= 1", "accuracy > 50", "mse < 0.1"],
    }


def test_a_model_factory_is_imported_and_named_by_its_entry() -> None:
    doc = experiment(
        models=[{"name": "custom", "factory": "qatbench.models.mlp:build_mlp"}],
        runtimes=["torch"],
        bits=["w8a8"],
    )
    assert ids(doc) == ["custom-fp32-fp32-torch", "custom-ptq-w8a8-torch"]


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        ("nosuch_module_qq:build", "cannot import 'nosuch_module_qq'"),
        ("qatbench.models.mlp:nothing", "has no callable 'nothing'"),
        ("not a target", "models[0].factory"),
    ],
)
def test_a_bad_model_factory_is_rejected(factory: str, fragment: str) -> None:
    message = config_error(experiment(models=[{"name": "custom", "factory": factory}]))
    assert "models[0].factory" in message
    assert fragment in message


def test_an_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError) as info:
        validate_experiment(experiment(models=["resnet9000"]), source="exp.yaml")
    assert info.value.kind == "model"
    assert "models[0].name" in str(info.value)
    assert "mlp" in info.value.known and "tiny_transformer" in info.value.known
    assert "known models: " in str(info.value)


# --- method options and expectations --------------------------------------------------------


def test_method_options_are_validated_by_the_methods_config() -> None:
    spec = validate_experiment(
        experiment(methods=[{"name": "ptq", "options": {"skip_layers": ["net.1"]}}])
    )
    assert spec.methods[0].options == {"skip_layers": ["net.1"]}


def test_an_unknown_method_option_is_rejected_naming_its_key_path() -> None:
    message = config_error(experiment(methods=["fp32", {"name": "ptq", "options": {"nosuch": 1}}]))
    assert "methods[1].options.nosuch" in message
    assert "unknown key" in message


def test_a_wrongly_typed_method_option_is_rejected() -> None:
    message = config_error(
        experiment(methods=[{"name": "ptq", "options": {"reduce_range": "sometimes"}}])
    )
    assert "methods[0].options.reduce_range" in message
    assert "'sometimes'" in message


@pytest.mark.parametrize(
    ("where", "doc"),
    [
        ("expect[0]", experiment(expect=["accuracy high"])),
        ("expect[1]", experiment(expect=["mse < 0.1", "mse < lots"])),
        ("models[0].expect[0]", experiment(models=[{"name": "mlp", "expect": ["mse ~ 1"]}])),
        (
            "methods[1].expect[0]",
            experiment(methods=["fp32", {"name": "ptq", "expect": ["< 0.1"]}]),
        ),
        ("methods[0].expect[0]", experiment(methods=[{"name": "fp32", "expect": ["mse != 0"]}])),
    ],
)
def test_expectation_syntax_errors_name_their_key(where: str, doc: dict[str, Any]) -> None:
    message = config_error(doc)
    assert f"exp.yaml: {where}: expectation " in message
    assert "'metric OP number'" in message


# --- invalid files ---------------------------------------------------------------------------


def test_every_invalid_fixture_has_a_case() -> None:
    on_disk = {p.name for p in INVALID.glob("*.yaml")}
    assert on_disk == set(INVALID_CASES) - {"missing.yaml"}


@pytest.mark.parametrize("name", sorted(INVALID_CASES))
def test_invalid_file_gives_one_line_naming_file_key_and_allowed(name: str) -> None:
    path = INVALID / name
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert isinstance(info.value, QatbenchError)
    assert info.value.exit_code == 2
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for fragment in INVALID_CASES[name]:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_a_directory_is_not_an_experiment_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_experiment(tmp_path)


def test_a_binary_file_is_not_an_experiment_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(info.value).startswith(f"{path}: ")


def test_yaml_is_read_with_the_safe_loader(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.yaml"
    path.write_text(
        "name: !!python/object/apply:os.system ['echo pwned']\nmodels: [mlp]\nmethods: [fp32]\n"
    )
    with pytest.raises(ConfigError, match="invalid YAML at line 1"):
        load_experiment(path)


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "ok\n", "with space", "x" * 65])
def test_names_that_are_unsafe_in_ids_and_paths_are_rejected(name: str) -> None:
    assert "name: " in config_error(experiment(name=name))
    message = config_error(
        experiment(models=[{"name": name, "factory": "qatbench.models.mlp:build_mlp"}])
    )
    assert "models[0].name" in message


# --- bit-width labels ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "weight", "activation", "canonical"),
    [
        ("w8a8", 8, 8, "w8a8"),
        ("w4a8", 4, 8, "w4a8"),
        ("w4", 4, None, "w4"),
        ("w2", 2, None, "w2"),
        ("w16a16", 16, 16, "w16a16"),
        (" w8a8 ", 8, 8, "w8a8"),
        ("w08a8", 8, 8, "w8a8"),
    ],
)
def test_bitwidth_parse(label: str, weight: int, activation: int | None, canonical: str) -> None:
    bits = BitWidth.parse(label)
    assert (bits.weight, bits.activation) == (weight, activation)
    assert bits.label == str(bits) == canonical
    assert bits.weight_only is (activation is None)
    assert BitWidth.parse(bits.label) == bits


def test_bitwidth_fp32() -> None:
    assert BitWidth.parse("fp32") is FP32
    assert FP32.label == "fp32"
    assert FP32.weight_only


@pytest.mark.parametrize(
    ("label", "fragment"),
    [
        ("int8", "not of the form"),
        ("W8A8", "not of the form"),
        ("w8a", "not of the form"),
        ("a8", "not of the form"),
        ("", "not of the form"),
        ("fp16", "not of the form"),
        ("w8a8w", "not of the form"),
        ("w1", "between 2 and 16"),
        ("w17", "between 2 and 16"),
        ("w32", "between 2 and 16"),
        ("w8a1", "between 2 and 16"),
        ("w4a0", "between 2 and 16"),
    ],
)
def test_bitwidth_parse_rejects(label: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        BitWidth.parse(label)
    assert repr(label) in str(info.value)


def test_bad_top_level_bits_are_a_config_error() -> None:
    message = config_error(experiment(bits=["w8a8", "int4"]))
    assert "bits" in message
    assert "'int4'" in message
    assert "wN" in message and "wNaM" in message and "fp32" in message
