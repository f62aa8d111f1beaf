"""Seconds each test module took in a whole-suite run, for ordering modules slowest first.

The suite runs under pytest-xdist with ``--dist loadscope`` (pyproject): each module goes
whole to one worker, so its module-scoped fixtures (pretrained models, sweeps whose results
several tests read) are built once, and the conftest hands modules out slowest first, so
that the two workers of a 2-core machine finish together instead of one waiting on a long
module picked up last. Only the order depends on these figures, never what runs; a module
missing here counts as ``DEFAULT_S``. (Modules whose in-process trials got much faster
when the conftest began freezing the heap were set from runs of those modules alone.)

Refresh after adding slow tests::

    pytest -q --junitxml=/tmp/suite.xml && python tests/data/durations.py /tmp/suite.xml
"""

from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET

DEFAULT_S = 2.0

MODULE_S: dict[str, float] = {
    "tests/test_ray_executor.py": 307,
    "tests/test_pytest_plugin.py": 184,
    "tests/test_nightly_gate.py": 124,
    "tests/test_cli.py": 116,
    "tests/test_mlflow_server.py": 109,
    "tests/test_resume.py": 104,
    "tests/test_openvino.py": 101,
    "tests/test_runtime_contract.py": 101,
    "tests/test_runner.py": 101,
    "tests/test_selftest.py": 85,
    "tests/test_sync.py": 69,
    "tests/test_shard_merge.py": 66,
    "tests/test_terminal_output.py": 65,
    "tests/test_invalid_corpus.py": 56,
    "tests/test_variants.py": 44,
    "tests/test_byo_model.py": 42,
    "tests/test_ray_cluster.py": 38,
    "tests/test_timing_passes.py": 35,
    "tests/test_ui.py": 34,
    "tests/test_auto_gate_nightly.py": 30,
    "tests/test_timing.py": 28,
    "tests/test_llm_trial.py": 13,
    "tests/test_fresh_instances.py": 12,
    "tests/test_hf.py": 12,
    "tests/test_cli_output.py": 11,
    "tests/test_trial.py": 10,
    "tests/test_cnn.py": 10,
    "tests/test_pick.py": 10,
    "tests/test_results.py": 10,
    "tests/test_tracking.py": 9,
    "tests/test_method_contract.py": 9,
    "tests/test_spec_property.py": 9,
    "tests/test_parity.py": 9,
    "tests/test_compare.py": 8,
    "tests/test_onnx_flavour.py": 8,
    "tests/test_history.py": 8,
    "tests/test_executor.py": 8,
    "tests/test_torch_compile.py": 7,
    "tests/test_gpt.py": 7,
    "tests/test_history_steps.py": 7,
    "tests/test_report_html.py": 6,
    "tests/test_linear4096.py": 3,
    "tests/test_mixed_precision.py": 3,
    "tests/test_trial_memory.py": 1,
}


def from_junit(path: str, at_least_s: float = 5.0) -> dict[str, float]:
    """Seconds per test module (``tests/test_x.py``) in a JUnit XML report."""
    seconds: collections.Counter[str] = collections.Counter()
    for case in ET.parse(path).iter("testcase"):
        package, module = (case.get("classname") or "").split(".")[:2]
        seconds[f"{package}/{module}.py"] += float(case.get("time") or 0.0)
    return {m: round(s) for m, s in seconds.most_common() if s >= at_least_s}


if __name__ == "__main__":
    for module, s in from_junit(sys.argv[1]).items():
        print(f'    "{module}": {s},')
