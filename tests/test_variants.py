"""Variants: labelled entries of one model or method, and method options expanded into a
grid, each a trial with its own id, metrics and MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest
from data.sweep_support import qatbench, report_trials, sqlite_uri, write_experiment

from qatbench.errors import ConfigError
from qatbench.spec.schema import validate_experiment


def _ids(doc: dict[str, object]) -> list[str]:
    return [t.id for t in validate_experiment(doc, source="v.yaml").expand()]


def test_a_grid_of_options_is_one_trial_per_value_with_a_label() -> None:
    ids = _ids(
        {
            "name": "v",
            "models": ["mlp"],
            "methods": [
                {
                    "name": "rtn",
                    "options": {"group_size": [32, 64], "symmetric": [True, False]},
                    "grid": ["group_size", "symmetric"],
                }
            ],
            "bits": ["w4"],
        }
    )
    assert ids == [
        "mlp-rtn.group_size_32.symmetric_True-w4-torch",
        "mlp-rtn.group_size_32.symmetric_False-w4-torch",
        "mlp-rtn.group_size_64.symmetric_True-w4-torch",
        "mlp-rtn.group_size_64.symmetric_False-w4-torch",
    ]


def test_a_list_where_the_method_takes_one_value_is_a_grid_and_a_list_option_is_not() -> None:
    doc = {
        "name": "v",
        "models": ["mlp"],
        "methods": [{"name": "rtn", "options": {"group_size": [32, 128], "keep_fp32": ["net.1"]}}],
        "bits": ["w4"],
    }
    spec = validate_experiment(doc, source="v.yaml")
    trials = spec.expand()
    assert [t.id for t in trials] == [
        "mlp-rtn.group_size_32-w4-torch",
        "mlp-rtn.group_size_128-w4-torch",
    ]
    assert [t.method.options["group_size"] for t in trials] == [32, 128]
    assert all(t.method.options["keep_fp32"] == ["net.1"] for t in trials)  # one value: a list


def test_a_list_the_option_cannot_take_item_by_item_is_one_line() -> None:
    doc = {
        "name": "v",
        "models": ["mlp"],
        "methods": [{"name": "rtn", "options": {"group_size": [32, "x"]}}],
        "bits": ["w4"],
    }
    with pytest.raises(ConfigError) as info:
        validate_experiment(doc, source="v.yaml")
    assert "methods[0].options.group_size" in str(info.value) and "\n" not in str(info.value)


def test_labels_tell_two_entries_of_one_model_apart_and_exclude_matches_them() -> None:
    doc = {
        "name": "v",
        "models": ["mlp", {"name": "mlp", "label": "mlp_narrow", "options": {"hidden": [64]}}],
        "methods": ["fp32", {"name": "ptq", "label": "ptq_pct", "options": {"observer": "mse"}}],
        "exclude": [{"model": "mlp_narrow", "method": "ptq"}],
    }
    assert _ids(doc) == [
        "mlp-fp32-fp32-torch",
        "mlp-ptq_pct-w8a8-torch",
        "mlp_narrow-fp32-fp32-torch",
    ]
    doc["models"] = ["mlp", {"name": "mlp", "options": {"hidden": [64]}}]
    doc["exclude"] = []
    with pytest.raises(ConfigError, match=r"duplicate trial id 'mlp-fp32-fp32-torch'.*label"):
        _ids(doc)


@pytest.mark.parametrize(
    ("method", "fragment"),
    [
        (
            {"name": "rtn", "options": {"group_size": 32}, "grid": ["group_size"]},
            "grid: 'group_size' needs a non-empty list in options (got 32)",
        ),
        (
            {"name": "rtn", "options": {"group_size": [32, 100]}, "grid": ["group_size"]},
            "methods[0].options.group_size",
        ),
    ],
)
def test_a_bad_grid_is_one_line(method: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        _ids({"name": "v", "models": ["mlp"], "methods": [method], "bits": ["w4"]})
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_grid_variants_run_as_trials_of_their_own(tmp_path: Path) -> None:
    exp = write_experiment(
        tmp_path / "exp.yaml",
        "variants",
        sqlite_uri(tmp_path / "mlruns"),
        # as the issue writes it: no grid key, the list where rtn takes one group size
        methods="[{name: rtn, options: {group_size: [32, null], keep_fp32: ['<first>']}}]",
        bits="[w4]",
    )
    proc = qatbench("run", exp, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (report,) = (tmp_path / "reports" / "variants").glob("*/report.json")
    trials = {t["id"]: t for t in report_trials(report)}
    assert set(trials) == {"mlp-rtn.group_size_32-w4-torch", "mlp-rtn.group_size_None-w4-torch"}
    runs = {t["mlflow_run_id"] for t in trials.values()}
    assert len(runs) == 2 and None not in runs
    sizes = {t["params"]["method"]["group_size"] for t in trials.values()}
    assert sizes == {32, None}
    assert all(t["status"] == "finished" and t["method"] == "rtn" for t in trials.values())
