"""report.html for language models and its warning flags: LM columns, simulated, ONNX parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_report_html import _open, browser  # noqa: F401  (the module's Chromium fixture)

from qatbench.report.flags import integer_bits, parity_flag, simulated_flag, trial_flags
from qatbench.report.html import build_view, write_html
from qatbench.results import RunRecord, TrialFailure, TrialResult

LM_COLUMNS = [
    ("perplexity", "perplexity"),
    ("perplexity_delta_vs_fp32", "Δ ppl"),
    ("next_token_accuracy", "next-token acc %"),
    ("prefill_latency_p50_ms", "prefill ms"),
    ("decode_tokens_per_s", "decode tok/s"),
    ("kv_cache_bytes", "KV cache"),
]


def _lm_trial(
    method: str,
    bits: str,
    runtime: str,
    ppl: float,
    details: dict[str, Any] | None = None,
    **extra: float,
) -> TrialResult:
    metrics = {
        "size_bytes": 1.6e6,
        "compression_ratio": 1.0,
        "mse": 0.01,
        "perplexity": ppl,
        "perplexity_fp32": 6.5,
        "perplexity_delta_vs_fp32": ppl - 6.5,
        "next_token_accuracy": 48.0 - (ppl - 6.5),
        "next_token_accuracy_delta_vs_fp32": -(ppl - 6.5),
        "prefill_latency_p50_ms": 4.2,
        "decode_tokens_per_s": 912.0,
        "kv_cache_bytes": 196608.0,
        "onnx_parity_max_abs": 1e-5,
        "onnx_parity_ok": 1.0,
        "int_op_fraction": 0.0 if method == "fp32" else 0.69,
        **extra,
    }
    return TrialResult(
        id=f"gpt_small-{method}-{bits}-{runtime}",
        model="gpt_small",
        method=method,
        bits=bits,
        runtime=runtime,
        status="finished",
        metrics=metrics,
        details={"simulated": False, **(details or {})},
    )


def _lm_record() -> RunRecord:
    failed = TrialResult(
        id="gpt_small-awq-w4-torch",
        model="gpt_small",
        method="awq",
        bits="w4",
        runtime="torch",
        status="failed",
        metrics={"int_op_fraction": 0.0},
        details={"simulated": True},
        error=TrialFailure("convert", "no kernel"),
    )
    return RunRecord(
        experiment={"name": "llm"},
        created="2025-11-29T00:00:00+00:00",
        env={},
        trials=(
            _lm_trial("fp32", "fp32", "torch", 6.5),
            _lm_trial("fp32", "fp32", "onnxruntime", 6.5),
            _lm_trial("bf16", "w16a16", "torch", 6.5, int_op_fraction=0.0),
            _lm_trial("rtn", "w4", "onnxruntime", 6.6),
            _lm_trial("fake_quant", "w8a8", "torch", 6.52, details={"simulated": True}),
            _lm_trial("ptq", "w8a8", "onnxruntime", 6.53, int_op_fraction=0.0),
            _lm_trial(
                "qat", "w4a8", "onnxruntime", 6.55, onnx_parity_ok=0.0, onnx_parity_max_abs=0.39
            ),
            failed,
        ),
    )


def _by_id(record: RunRecord) -> dict[str, TrialResult]:
    return {t.id: t for t in record.trials}


# --- flags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "integer"),
    [("w8a8", True), ("w4", True), ("w2a4", True), ("fp32", False), ("w16a16", False)],
)
def test_integer_bits(bits: str, integer: bool) -> None:
    assert integer_bits(bits) is integer


def test_simulated_when_the_method_says_so_or_no_integer_kernel_runs() -> None:
    trials = _by_id(_lm_record())
    flagged = {tid for tid, t in trials.items() if simulated_flag(t)}
    assert flagged == {"gpt_small-fake_quant-w8a8-torch", "gpt_small-ptq-w8a8-onnxruntime"}
    # why, in the badge's title
    assert "fake-quant" in simulated_flag(trials["gpt_small-fake_quant-w8a8-torch"]).title
    assert "int_op_fraction is 0" in simulated_flag(trials["gpt_small-ptq-w8a8-onnxruntime"]).title


def test_parity_mismatch_names_the_difference() -> None:
    trials = _by_id(_lm_record())
    assert {tid for tid, t in trials.items() if parity_flag(t)} == {
        "gpt_small-qat-w4a8-onnxruntime"
    }
    flag = parity_flag(trials["gpt_small-qat-w4a8-onnxruntime"])
    assert flag is not None and "0.39" in flag.title
    # a trial that has no onnx_parity_ok (older reports) is not flagged
    old = trials["gpt_small-rtn-w4-onnxruntime"]
    metrics = {k: v for k, v in old.metrics.items() if k != "onnx_parity_ok"}
    assert trial_flags(TrialResult(**{**old.__dict__, "metrics": metrics})) == []


# --- view-model -------------------------------------------------------------------------


def test_lm_columns_appear_only_for_language_models(sample_record: RunRecord) -> None:
    model = build_view(_lm_record())["models"][0]
    columns = [(c["metric"], c["header"]) for c in model["columns"]]
    assert [c for c in columns if c in LM_COLUMNS] == LM_COLUMNS
    digits = build_view(sample_record)["models"][0]["columns"]
    assert not {c["metric"] for c in digits} & {m for m, _ in LM_COLUMNS}


def test_lm_cells_are_formatted_with_their_deltas() -> None:
    model = build_view(_lm_record())["models"][0]
    row = next(r for r in model["rows"] if r["id"] == "gpt_small-rtn-w4-onnxruntime")
    cells = {c["metric"]: cell for c, cell in zip(model["columns"], row["cells"], strict=True)}
    assert cells["perplexity"]["text"] == "6.6"
    assert cells["perplexity_delta_vs_fp32"]["text"] == "+0.1000"
    assert cells["next_token_accuracy"]["text"] == "47.90"
    assert cells["next_token_accuracy"]["note"] == "Δ -0.10"  # percent points, 2 decimals
    assert cells["kv_cache_bytes"]["text"] == "192 KiB"
    assert float(cells["decode_tokens_per_s"]["value"]) == 912.0


def test_rows_carry_flags_and_the_parity_cell_is_marked() -> None:
    model = build_view(_lm_record())["models"][0]
    flags = {r["id"]: [f["key"] for f in r["flags"]] for r in model["rows"]}
    assert flags["gpt_small-qat-w4a8-onnxruntime"] == ["parity"]
    assert flags["gpt_small-fake_quant-w8a8-torch"] == ["simulated"]
    assert flags["gpt_small-fp32-fp32-onnxruntime"] == []  # fp32 runs no integer kernel by design
    assert flags["gpt_small-bf16-w16a16-torch"] == []
    assert flags["gpt_small-awq-w4-torch"] == []  # failed: nothing to flag
    index = [c["metric"] for c in model["columns"]].index("onnx_parity_max_abs")
    marked = {r["id"] for r in model["rows"] if r["cells"][index]["flag"] == "bad"}
    assert marked == {"gpt_small-qat-w4a8-onnxruntime"}
    assert {f["key"]: len(f["ids"]) for f in model["flagged"]} == {"simulated": 2, "parity": 1}


# --- in a real browser --------------------------------------------------------------------


def test_lm_columns_and_flags_in_chromium(browser, tmp_path: Path) -> None:  # noqa: F811  (the fixture)
    path = write_html(_lm_record(), tmp_path / "report.html")
    page, seen, _ = _open(browser, path)
    assert seen["errors"] == [] and seen["console"] == []
    headers = [h.strip() for h in page.locator("#model-0-table thead th").all_inner_texts()]
    assert all(header in headers for _, header in LM_COLUMNS)

    badges = page.locator("#model-0-table .badge.flag-simulated")
    assert badges.count() == 2 and badges.first.is_visible()
    flagged_rows = page.eval_on_selector_all(
        "#model-0-table tr:has(.flag-simulated) td.id code", "cs => cs.map(c => c.textContent)"
    )
    assert sorted(flagged_rows) == [
        "gpt_small-fake_quant-w8a8-torch",
        "gpt_small-ptq-w8a8-onnxruntime",
    ]
    assert "fake-quant" in badges.first.get_attribute("title")

    parity = page.locator("#model-0-table td.flag-bad")
    assert parity.count() == 1 and parity.is_visible() and "mismatch" in parity.inner_text()
    bad = page.eval_on_selector("td.flag-bad", "e => getComputedStyle(e).color")
    plain = page.eval_on_selector("#model-0-table tbody td.num", "e => getComputedStyle(e).color")
    assert bad != plain  # drawn in the warning colour, not like every other cell
    assert page.locator(".badge.flag-parity").count() == 1

    warnings = page.locator("#model-0 p.flagged")
    assert warnings.count() == 2
    assert "ONNX parity mismatch" in page.locator("#model-0 p.flag-parity").inner_text()

    search = page.locator("input[data-filter='model-0-table']")
    search.fill("simulated")  # the badge text makes flagged rows findable
    assert page.locator("#model-0-table tbody tr:visible").count() == 2
    page.close()
