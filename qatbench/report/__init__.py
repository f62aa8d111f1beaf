"""Reports of a run: ``report.json`` (its JSON Schema), ``report.html``, compare and history.

``write_html(RunRecord.load(Path("report.json")), Path("report.html"))`` writes the page;
``compare.compare(a, b, parse_gates(["latency_p50_ms:+5%"]))`` judges two runs;
``history.history(name, sweeps, "latency_p50_ms_b1")`` follows a metric over the sweeps of an
experiment (:mod:`qatbench.report.sources` loads them). :data:`SCHEMA_PATH` is the JSON
Schema (draft 2020-12) of ``report.json``.
"""

import json
from pathlib import Path
from typing import Any

from qatbench.report.compare import CompareResult, Gate, parse_gate, parse_gates
from qatbench.report.history import History
from qatbench.report.html import build_view, render_html, write_html

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def load_schema() -> dict[str, Any]:
    """The JSON Schema of ``report.json`` as a dict."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return schema


__all__ = [
    "SCHEMA_PATH",
    "CompareResult",
    "Gate",
    "History",
    "build_view",
    "load_schema",
    "parse_gate",
    "parse_gates",
    "render_html",
    "write_html",
]
