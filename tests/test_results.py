"""report.json: round-trips through results.py, refuses other schema versions, and matches
its JSON Schema (qatbench/report/report.schema.json), checked on real trials.

The schema is checked by a small draft 2020-12 validator below (the keywords the schema
uses), and additionally by the ``jsonschema`` package when it is installed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qatbench.errors import ConfigError
from qatbench.report import SCHEMA_PATH, load_schema
from qatbench.results import SCHEMA_VERSION, RunRecord, TrialFailure, TrialResult

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
    "integer": int,
    "number": (int, float),
}


_DATE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def schema_errors(
    value: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "$"
) -> list[str]:
    """Violations of ``schema`` by ``value`` (the draft 2020-12 keywords the schema uses)."""
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        return schema_errors(value, root["$defs"][ref.split("/")[-1]], root, path)
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_is_type(value, n) for n in names):
            return [f"{path}: {value!r:.60} is not of type {types}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minLength" in schema and isinstance(value, str) and len(value) < schema["minLength"]:
        errors.append(f"{path}: shorter than {schema['minLength']}")
    if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if (
        schema.get("format") == "date-time"
        and isinstance(value, str)
        and not _DATE_TIME.fullmatch(value)
    ):
        errors.append(f"{path}: {value!r} is not an RFC 3339 date-time")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing required {key!r}")
        props, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            where = f"{path}.{key}"
            matched = [s for p, s in patterns.items() if re.search(p, key)]
            if key in props:
                errors += schema_errors(item, props[key], root, where)
            for sub in matched:
                errors += schema_errors(item, sub, root, where)
            if key not in props and not matched:
                if extra is False:
                    errors.append(f"{where}: additional property not allowed")
                elif isinstance(extra, dict):
                    errors += schema_errors(item, extra, root, where)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], root, f"{path}[{i}]")
    if "oneOf" in schema:
        passing = sum(not schema_errors(value, s, root, path) for s in schema["oneOf"])
        if passing != 1:
            errors.append(f"{path}: matches {passing} of oneOf, not exactly 1")
    if "if" in schema:
        branch = "then" if not schema_errors(value, schema["if"], root, path) else "else"
        if branch in schema:
            errors += schema_errors(value, schema[branch], root, path)
    return errors


def as_json(record: RunRecord) -> Any:
    """What report.json holds: the record written by RunRecord.save and parsed back."""
    return json.loads(json.dumps(record.to_dict()))


def assert_valid(data: Any) -> None:
    schema = load_schema()
    assert schema_errors(data, schema, schema) == []
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft202012Validator(schema).validate(data)


# --- round trip and versions ------------------------------------------------------------


def test_round_trip_through_json_is_lossless(sample_record: RunRecord, tmp_path: Path) -> None:
    assert RunRecord.from_dict(as_json(sample_record)) == sample_record
    sample_record.save(tmp_path / "report.json")
    assert RunRecord.load(tmp_path / "report.json") == sample_record


def test_real_record_round_trips(real_record: RunRecord, tmp_path: Path) -> None:
    real_record.save(tmp_path / "report.json")
    loaded = RunRecord.load(tmp_path / "report.json")
    assert loaded == real_record
    assert loaded.trials[0].details["latency_samples"]["b4"]["fp32_ms"]


def test_non_finite_metrics_survive_the_round_trip(sample_record: RunRecord) -> None:
    trial = replace(sample_record.trials[0], metrics={"mse": math.nan, "ratio": math.inf})
    loaded = RunRecord.from_dict(
        json.loads(json.dumps(replace(sample_record, trials=(trial,)).to_dict()))
    )
    assert math.isnan(loaded.trials[0].metrics["mse"])
    assert loaded.trials[0].metrics["ratio"] == math.inf


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, None, "1"])
def test_another_schema_version_is_refused(sample_record, tmp_path: Path, version) -> None:
    data = sample_record.to_dict()
    data["schema_version"] = version
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: schema_version {version!r}"):
        RunRecord.load(path)


def test_with_trial_replaces_a_result_of_the_same_id(sample_record: RunRecord) -> None:
    failed = replace(
        sample_record.trials[0], status="failed", error=TrialFailure("measure", "boom")
    )
    updated = sample_record.with_trial(failed)
    assert len(updated.trials) == len(sample_record.trials)
    assert updated.trials[-1] == failed


def test_trial_result_keeps_its_run_id() -> None:
    trial = TrialResult(
        id="m-fp32-fp32-torch",
        model="m",
        method="fp32",
        bits="fp32",
        runtime="torch",
        status="finished",
    )
    assert TrialResult.from_dict(trial.with_run_id("abc").to_dict()).mlflow_run_id == "abc"


# --- the JSON Schema ----------------------------------------------------------------------


def test_schema_is_shipped_and_versioned() -> None:
    schema = load_schema()
    assert SCHEMA_PATH.name == "report.schema.json" and SCHEMA_PATH.is_file()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    # every field the writer produces is a documented property (additional ones refused)
    assert set(schema["required"]) | {"tracking"} == set(
        RunRecord(experiment={}, created="", env={}).to_dict()
    )
    trial = schema["$defs"]["trial"]
    assert set(trial["required"]) == set(
        TrialResult(id="", model="", method="", bits="", runtime="", status="finished").to_dict()
    )


def _undocumented(node: Any, path: str = "$") -> list[str]:
    """Properties without a description, anywhere in the schema (conditions aside)."""
    missing = []
    if isinstance(node, dict):
        node = {k: v for k, v in node.items() if k not in ("if", "then", "else")}
        for group in ("properties", "patternProperties"):
            for key, sub in node.get(group, {}).items():
                if "description" not in sub and "$ref" not in sub:
                    missing.append(f"{path}.{key}")
        for key, sub in node.items():
            missing += _undocumented(sub, f"{path}.{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            missing += _undocumented(sub, f"{path}[{i}]")
    return missing


def test_every_field_is_documented() -> None:
    schema = load_schema()
    assert _undocumented(schema) == []
    assert all("description" in d for d in schema["$defs"].values())


def test_canonical_metric_names_are_documented() -> None:
    metrics = load_schema()["$defs"]["metrics"]
    for name in (
        "size_bytes",
        "compression_ratio",
        "mse",
        "sqnr_db",
        "accuracy",
        "int_op_fraction",
        "peak_rss_bytes",
    ):
        assert name in metrics["properties"]
    for name in ("latency_p50_ms_b1", "throughput_per_s_b64", "speedup_ci_low_b16"):
        assert any(re.search(p, name) for p in metrics["patternProperties"]), name


def test_real_record_matches_the_schema(real_record: RunRecord) -> None:
    statuses = [t.status for t in real_record.trials]
    assert statuses == ["finished", "failed"], [t.error for t in real_record.trials]
    data = as_json(real_record)
    assert data["trials"][0]["details"]["per_layer"]
    assert data["trials"][1]["error"]["phase"] == "build"
    assert_valid(data)


def test_sample_record_matches_the_schema(sample_record: RunRecord) -> None:
    assert_valid(as_json(sample_record))


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (lambda d: d.pop("created"), "missing required 'created'"),
        (lambda d: d.update(schema_version=2), "is not 1"),
        (lambda d: d.update(surprise=1), "$.surprise: additional property"),
        (lambda d: d["trials"][0].update(status="done"), "not one of"),
        (lambda d: d["trials"][0]["metrics"].update(size_bytes="big"), "size_bytes: 'big'"),
        (lambda d: d["trials"][0].update(error={"phase": "build", "reason": "x"}), "type null"),
        (lambda d: d["trials"][-1].update(error=None), "is not of type object"),
        (
            lambda d: d["trials"][0]["details"]["latency_samples"].update(b1={"fp32_ms": []}),
            "missing required 'candidate_ms'",
        ),
        (lambda d: d.update(created="yesterday"), "RFC 3339"),
    ],
)
def test_schema_rejects_malformed_reports(sample_record: RunRecord, mutate, complaint) -> None:
    data = as_json(sample_record)
    mutate(data)
    schema = load_schema()
    errors = schema_errors(data, schema, schema)
    assert any(complaint in e for e in errors), errors
