"""report.html shows a task's own metrics (embedding cosine, a user's metric) as table columns,
quality first, with their direction and change against fp32; generic over tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_report_html import _column, _open, browser  # noqa: F401  (the module's Chromium fixture)

from qatbench.report.html import build_view, write_html
from qatbench.results import RunRecord, TrialResult

EMBEDDING = {"embedding_cosine": "higher", "retrieval_agreement": "higher"}


def _trial(
    method: str, runtime: str, directions: dict[str, str] | None, **metrics: float
) -> TrialResult:
    return TrialResult(
        id=f"enc-{method}-{runtime}",
        model="enc",
        method=method,
        bits="fp32" if method == "fp32" else "w8a8",
        runtime=runtime,
        status="finished",
        metrics={
            "size_bytes": 9e7 if method == "fp32" else 2.4e7,
            "mse": 0.0 if method == "fp32" else 1e-3,
            "speedup_vs_fp32_b1": 1.0 if method == "fp32" else 3.1,
            **metrics,
        },
        details={"metric_directions": directions} if directions is not None else {},
    )


def _embedding_record() -> RunRecord:
    return RunRecord(
        experiment={"name": "encoder"},
        created="2026-12-05T00:00:00+00:00",
        env={},
        trials=(
            _trial("fp32", "torch", EMBEDDING, embedding_cosine=1.0, retrieval_agreement=100.0),
            _trial(
                "dynamic",
                "onnxruntime",
                EMBEDDING,
                embedding_cosine=0.99183,
                retrieval_agreement=93.75,
            ),
            _trial("ptq", "torch", EMBEDDING, embedding_cosine=0.9221, retrieval_agreement=62.5),
        ),
    )


def _user_record() -> RunRecord:
    """A user's task with a lower-is-better metric and its recorded delta."""
    way = {"word_error_rate": "lower"}
    return RunRecord(
        experiment={"name": "asr"},
        created="2026-12-05T00:00:00+00:00",
        env={},
        trials=(
            _trial("fp32", "torch", way, word_error_rate=12.0, word_error_rate_fp32=12.0),
            _trial(
                "rtn",
                "torch",
                way,
                word_error_rate=12.5,
                word_error_rate_fp32=12.0,
                word_error_rate_delta_vs_fp32=0.5,
            ),
            _trial("dynamic", "torch", way, word_error_rate=12.25),  # no delta recorded
        ),
    )


def _cells(model: dict[str, Any], trial_id: str) -> dict[str, dict[str, str]]:
    row = next(r for r in model["rows"] if r["id"] == trial_id)
    return {c["metric"]: cell for c, cell in zip(model["columns"], row["cells"], strict=True)}


def test_embedding_metrics_are_columns_before_the_output_error() -> None:
    model = build_view(_embedding_record())["models"][0]
    metrics = [c["metric"] for c in model["columns"]]
    assert metrics[:3] == ["embedding_cosine", "retrieval_agreement", "mse"]
    headers = {c["metric"]: c["header"] for c in model["columns"]}
    assert headers["embedding_cosine"] == "embedding cosine ↑"
    assert model["columns"][0]["direction"] == "higher is better"
    assert not model["columns"][2]["task"]  # mse is output error, not the task's

    cells = _cells(model, "enc-dynamic-onnxruntime")
    assert cells["embedding_cosine"]["text"] == "0.99183"  # not rounded up to 0.992
    assert cells["embedding_cosine"]["note"] == "Δ -0.00817"  # against fp32's 1.0
    assert cells["retrieval_agreement"]["text"] == "93.75"
    assert float(cells["retrieval_agreement"]["value"]) == 93.75
    assert _cells(model, "enc-fp32-torch")["embedding_cosine"]["note"] == ""

    card = model["best"]["quality"]
    assert card["id"] == "enc-dynamic-onnxruntime" and card["metric"] == "embedding_cosine"
    assert card["title"] == "best embedding cosine (quantized)"


def test_a_users_lower_is_better_metric_gets_its_column_and_card() -> None:
    model = build_view(_user_record())["models"][0]
    column = model["columns"][0]
    assert (column["metric"], column["header"], column["direction"]) == (
        "word_error_rate",
        "word error rate ↓",
        "lower is better",
    )
    # the derived figures are not columns of their own
    assert "word_error_rate_fp32" not in {c["metric"] for c in model["columns"]}
    assert _cells(model, "enc-rtn-torch")["word_error_rate"]["note"] == "Δ +0.5"  # recorded
    assert _cells(model, "enc-dynamic-torch")["word_error_rate"]["note"] == "Δ +0.25"  # computed
    card = model["best"]["quality"]
    assert card["id"] == "enc-dynamic-torch" and card["title"].startswith("lowest word error")


def test_without_declared_directions_no_task_column_is_invented() -> None:
    record = _user_record()
    bare = tuple(
        TrialResult(**{**t.__dict__, "details": {}}) for t in record.trials
    )  # an old report.json: no metric_directions, and word_error_rate is no built-in
    model = build_view(RunRecord(**{**record.__dict__, "trials": bare}))["models"][0]
    assert "word_error_rate" not in {c["metric"] for c in model["columns"]}


def test_task_columns_in_chromium(browser, tmp_path: Path) -> None:  # noqa: F811  (the fixture)
    path = write_html(_embedding_record(), tmp_path / "report.html")
    page, seen, _ = _open(browser, path)
    assert seen["errors"] == [] and seen["console"] == []
    headers = [h.strip() for h in page.locator("#model-0-table thead th").all_inner_texts()]
    assert headers[1:3] == ["embedding cosine ↑", "retrieval agreement ↑"]
    cosine = page.locator("#model-0-table thead th", has_text="embedding cosine")
    box = cosine.bounding_box()
    assert box is not None and box["x"] + box["width"] <= 1400  # in view without scrolling
    assert "higher is better" in (cosine.get_attribute("title") or "")

    cosine.click()  # sorts by the task metric like any numeric column
    ascending = [float(v) for v in _column(page, "model-0-table", "embedding cosine ↑")]
    assert ascending == sorted(ascending) and ascending[0] == 0.9221
    assert "0.99183" in page.locator("#model-0-table tbody").inner_text()


def test_the_terminal_task_column_falls_back_to_the_tasks_own_metric() -> None:
    from qatbench.report.summary import task_metric

    fp32, dynamic, _ = _embedding_record().trials
    shown = task_metric(dynamic, fp32)
    assert shown is not None
    assert (shown.name, shown.value, shown.delta, shown.worse) == (
        "embedding_cosine",
        "0.99183",
        "-0.00817",
        True,
    )
    assert task_metric(fp32, fp32) is not None and task_metric(fp32, fp32).delta == ""
    rtn = _user_record().trials[1]
    lower = task_metric(rtn, _user_record().trials[0])
    assert lower is not None and lower.delta == "+0.5" and lower.worse  # lower is better


def test_the_quality_card_takes_a_tasks_own_metric_in_its_direction(sample_record) -> None:
    from dataclasses import replace

    from qatbench.report.html import best_quality

    trials = []
    for i, t in enumerate(sample_record.trials[:6]):
        cosine = 1.0 if t.method == "fp32" else 0.99 - 0.001 * i
        metrics = {k: v for k, v in t.metrics.items() if "accuracy" not in k}
        metrics["embedding_cosine"] = cosine
        details = {**t.details, "metric_directions": {"embedding_cosine": "higher"}}
        trials.append(replace(t, metrics=metrics, details=details))
    baseline = next(t for t in trials if t.method == "fp32" and t.runtime == "torch")
    card = best_quality(trials, baseline)
    best = max(t.metrics["embedding_cosine"] for t in trials if t.method != "fp32")
    assert card is not None and "embedding" in card["title"].lower()
    assert card["text"] == f"{best:.5g}"
