"""report.html: the view-model, escaping, and the page in a real headless Chromium."""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qatbench.report.distributions import MAX_DOTS
from qatbench.report.html import build_view, render_html, write_html
from qatbench.report.html_charts import pareto_front
from qatbench.results import RunRecord, TrialResult

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]
TIMES = "\u00d7"  # the multiplication sign that follows a ratio
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def _model(view: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in view["models"] if m["name"] == name)


def _row(model: dict[str, Any], trial_id: str) -> dict[str, Any]:
    return next(r for r in model["rows"] if r["id"] == trial_id)


def _cell(model: dict[str, Any], trial_id: str, metric: str) -> dict[str, str]:
    index = [c["metric"] for c in model["columns"]].index(metric)
    return _row(model, trial_id)["cells"][index]


def _chart_numbers(chart: dict[str, Any]) -> list[float]:
    """Every coordinate of a chart's geometry, flattened."""
    marks = chart["marks"]
    coords = [v for mk in marks for v in (mk["cx"], mk["cy"])]
    coords += [v for mk in marks if mk["bar"] for v in mk["bar"].values()]
    coords += [t["pos"] for t in chart["x_ticks"] + chart["y_ticks"]] + [chart["ref_x"]]
    return coords + [float(v) for v in _NUMBER.findall(chart["frontier"])]


def _details(latency_ms: float, seed: int, rounds: int = 600) -> dict[str, Any]:
    """What a real trial records: paired rounds at batch 1 and 64, ten per-layer rows."""
    rng = np.random.default_rng(seed)
    samples = {
        f"b{n}": {
            "candidate_ms": (latency_ms * n**0.5 * rng.lognormal(0, 0.1, rounds)).tolist(),
            "fp32_ms": (n**0.5 * rng.lognormal(0, 0.1, rounds)).tolist(),
        }
        for n in (1, 64)
    }
    layers = [
        {
            "layer": f"blocks.{i}.mlp.fc",
            "type": "QuantizedLinear",
            "mse": 1e-3 * i,
            "max_abs_error": 0.1,
            "sqnr_db": 20.0 + i,
            "cosine": 0.999,
        }
        for i in range(10)
    ]
    return {"latency_samples": samples, "per_layer": layers}


def _many_trials(models: int = 3) -> RunRecord:
    """A 30-trial record: per model fp32 and ptq at four bit-widths, on two runtimes."""
    trials = []
    for m in range(models):
        for k, (method, bits) in enumerate(
            [("fp32", "fp32"), ("ptq", "w8a8"), ("ptq", "w6a8"), ("ptq", "w4a8"), ("ptq", "w3a8")]
        ):
            for runtime, speed in (("torch", 0.5), ("onnxruntime", 2.0)):
                ratio = 32 / int(bits[1:].split("a")[0]) if method == "ptq" else 1.0
                speedup = 1.0 if (method, runtime) == ("fp32", "torch") else speed + 0.1 * k
                trials.append(
                    TrialResult(
                        id=f"m{m}-{method}-{bits}-{runtime}",
                        model=f"m{m}",
                        method=method,
                        bits=bits,
                        runtime=runtime,
                        status="finished",
                        details=_details(1 / speedup, k),
                        metrics={
                            "size_bytes": 4e5 / ratio,
                            "compression_ratio": ratio,
                            "speedup_vs_fp32_b1": speedup,
                            "speedup_ci_low_b1": speedup - 0.1,
                            "speedup_ci_high_b1": speedup + 0.1,
                            "latency_p50_ms_b1": 1 / speedup,
                            "mse": 10.0 ** (k - 6),
                            "accuracy": 0.9 - 0.01 * k,
                        },
                    )
                )
    return RunRecord(
        experiment={"name": "sweep"},
        created="2025-11-29T00:00:00+00:00",
        env={"python": "3.11"},
        trials=tuple(trials),
    )


# --- view-model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "front"),
    [
        ([], []),
        ([("a", 1.0, 0.5)], ["a"]),
        ([("a", 1.0, 0.5), ("b", 2.0, 0.1)], ["b"]),  # b is better on both
        ([("a", 1.0, 0.1), ("b", 2.0, 0.5), ("c", 1.5, 0.6)], ["a", "b"]),
        ([("a", 2.0, 0.1), ("b", 2.0, 0.1)], ["a", "b"]),  # equal points do not dominate
        ([("a", 2.0, 0.1), ("b", 2.0, 0.2)], ["a"]),  # same x, worse error
    ],
)
def test_pareto_front_maximises_x_and_minimises_error(points, front) -> None:
    assert pareto_front(points) == front


def test_pareto_sets_per_model(sample_record: RunRecord) -> None:
    mlp = _model(build_view(sample_record), "mlp")
    assert mlp["pareto"]["size"] == [
        "fp32 · torch",
        "fp32 · onnxruntime",
        "ptq w8a8 · torch",
        "ptq w4a8 · torch",
    ]
    assert mlp["pareto"]["speed"] == [
        "fp32 · torch",
        "fp32 · onnxruntime",
        "ptq w8a8 · onnxruntime",
    ]
    assert _row(mlp, "mlp-ptq-w8a8-onnxruntime")["fronts"] == ["speed"]
    assert _row(mlp, "mlp-ptq-w4a8-onnxruntime")["fronts"] == []


def test_best_methods_on_size_speed_and_error(sample_record: RunRecord) -> None:
    best = _model(build_view(sample_record), "mlp")["best"]
    picked = {key: (b["id"], b["text"]) for key, b in best.items() if key != "quality"}
    assert picked == {
        "size": ("mlp-ptq-w4a8-torch", f"6.42{TIMES}"),
        "speed": ("mlp-ptq-w8a8-onnxruntime", f"2.71{TIMES}"),
        # fp32 (mse 0) is no candidate for the lowest error: only quantized trials are
        "error": ("mlp-ptq-w8a8-torch", "2.10e-04"),
    }
    assert best["error"]["label"] == "ptq w8a8 · torch"


def _in_percent(record: RunRecord) -> RunRecord:
    """The record with accuracy in percent, as trials write it (the fixture has fractions)."""
    scaled = ("accuracy", "accuracy_delta_vs_fp32", "accuracy_fp32")
    return replace(
        record,
        trials=tuple(
            replace(t, metrics={k: v * 100 if k in scaled else v for k, v in t.metrics.items()})
            for t in record.trials
        ),
    )


def test_size_and_accuracy_deltas_against_the_fp32_torch_baseline(sample_record) -> None:
    mlp = _model(build_view(_in_percent(sample_record)), "mlp")
    assert mlp["baseline"] == "mlp-fp32-fp32-torch"
    assert _row(mlp, "mlp-fp32-fp32-torch")["baseline"]
    assert _cell(mlp, "mlp-ptq-w8a8-torch", "size_bytes")["note"] == "-72.8% vs fp32"
    assert _cell(mlp, "mlp-ptq-w8a8-torch", "accuracy")["note"] == "Δ -0.17"
    assert _cell(mlp, "mlp-ptq-w8a8-torch", "accuracy")["text"] == "97.05"  # 2 decimals
    assert _cell(mlp, "mlp-fp32-fp32-torch", "size_bytes")["note"] == ""  # itself


def test_accuracy_delta_is_derived_from_the_baseline_when_not_recorded(sample_record) -> None:
    trials = tuple(
        replace(t, metrics={k: v for k, v in t.metrics.items() if k != "accuracy_delta_vs_fp32"})
        for t in _in_percent(sample_record).trials
    )
    mlp = _model(build_view(replace(sample_record, trials=trials)), "mlp")
    assert _cell(mlp, "mlp-ptq-w4a8-torch", "accuracy")["note"] == "Δ -1.11"


def test_no_baseline_means_no_deltas(sample_record: RunRecord) -> None:
    trials = tuple(t for t in sample_record.trials if t.method != "fp32")
    mlp = _model(build_view(replace(sample_record, trials=trials)), "mlp")
    assert mlp["baseline"] == ""
    assert _cell(mlp, "mlp-ptq-w4a8-torch", "size_bytes")["note"] == ""


def test_columns_follow_the_metrics_and_batch_sizes_present(sample_record) -> None:
    view = build_view(sample_record)
    mlp = [c["metric"] for c in _model(view, "mlp")["columns"]]
    # task quality and error first, then size, then speed
    assert mlp[:4] == ["accuracy", "mse", "max_abs_error", "sqnr_db"]
    assert mlp.index("int_op_fraction") < mlp.index("size_bytes")
    assert mlp[mlp.index("size_bytes") :][:3] == ["size_bytes", "compression_ratio", "weight_bytes"]
    assert "speedup_vs_fp32_b64" in mlp and "throughput_per_s_b16" not in mlp
    other = [c["metric"] for c in view["models"][1]["columns"]]
    assert "throughput_per_s_b16" in other and "onnx_size_bytes" in other
    assert not any(m.startswith("speedup_ci_") or m.endswith("_delta_vs_fp32") for m in mlp)


def test_cells_carry_sortable_values_and_the_speedup_interval(sample_record) -> None:
    mlp = _model(build_view(sample_record), "mlp")
    cell = _cell(mlp, "mlp-ptq-w8a8-onnxruntime", "speedup_vs_fp32_b1")
    assert (cell["text"], cell["value"], cell["note"]) == (f"2.71{TIMES}", "2.71", "[2.59, 2.83]")
    other = build_view(sample_record)["models"][1]
    failed = _cell(other, other["rows"][-1]["id"], "size_bytes")
    assert (failed["text"], failed["value"]) == ("—", "")


def test_header_failures_and_environment(sample_record: RunRecord) -> None:
    view = build_view(sample_record)
    assert view["counts"] == {"total": 12, "finished": 11, "failed": 1}
    assert view["tracking"] == {
        "uri": "file:///work/main/mlruns",
        "experiment_id": "417263801",
        "link": "",
        "browse": "mlflow ui --backend-store-uri file:///work/main/mlruns --workers 1",
    }
    assert [(f["phase"], f["model"]) for f in view["failed"]] == [
        ("convert", "<script>alert(1)</script>")
    ]
    env = {e["key"]: e["value"] for e in view["env"]}
    assert env["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert env["versions"].startswith('{"mlflow": "3.5.1"')
    assert env["git_dirty"] == "false"


def test_charts_are_finite_and_draw_the_frontier(sample_record: RunRecord) -> None:
    for model in build_view(sample_record)["models"]:
        for chart in model["charts"]:
            assert chart["marks"] and chart["frontier"]
            assert all(math.isfinite(v) for v in _chart_numbers(chart))
        speed = model["charts"][1]
        assert all(mk["bar"] for mk in speed["marks"])  # every trial has a speed-up CI


def test_single_point_and_missing_metrics_are_handled(sample_record: RunRecord) -> None:
    lone = replace(sample_record.trials[2], metrics={"mse": 0.0, "compression_ratio": 1.0})
    view = build_view(replace(sample_record, trials=(lone,)))
    size, speed = view["models"][0]["charts"]
    assert len(size["marks"]) == 1 and size["marks"][0]["floor"]
    assert all(math.isfinite(v) for v in _chart_numbers(size))
    assert "speedup_vs_fp32_b1" in speed["empty"]
    assert view["models"][0]["best"]["speed"] is None
    assert "NaN" not in render_html(replace(sample_record, trials=(lone,)))


def test_runs_link_to_an_http_mlflow_server_only(sample_record: RunRecord) -> None:
    served = replace(sample_record, tracking={"uri": "http://mlflow:5000/", "experiment_id": 0})
    view = build_view(served)
    row = view["models"][0]["rows"][0]
    assert view["tracking"]["experiment_id"] == "0"
    assert view["tracking"]["link"] == "http://mlflow:5000/#/experiments/0"
    assert view["tracking"]["browse"] == ""
    assert row["run_link"] == f"http://mlflow:5000/#/experiments/0/runs/{row['run_id']}"
    worst = view["models"][0]["layers"][0]
    assert worst["run_link"].endswith(f"/runs/{worst['run_id']}")
    assert build_view(sample_record)["models"][0]["rows"][0]["run_link"] == ""  # file: store


# --- latency distributions and per-layer error -------------------------------------------


def test_latency_distributions_per_batch_size(sample_record: RunRecord) -> None:
    mlp = _model(build_view(sample_record), "mlp")
    assert [c["title"] for c in mlp["latency"]] == [
        "latency per call, batch 1",
        "latency per call, batch 64",
    ]
    b1 = mlp["latency"][0]
    assert len(b1["rows"]) == 6  # every finished trial recorded samples
    medians = [r["median"] for r in b1["rows"]]
    assert medians == sorted(medians)  # fastest first
    assert b1["rows"][0]["label"] == "ptq w8a8 · onnxruntime"
    for row in b1["rows"]:
        assert row["lo"] <= row["q1"] <= row["median"] <= row["q3"] <= row["hi"]
        assert 0 < len(row["dots"]) <= MAX_DOTS
        coords = [row["lo"], row["hi"], *(v for d in row["dots"] for v in d.values())]
        assert all(math.isfinite(v) and 0 <= v <= b1["width"] for v in coords)
        assert row["title"].count("\n") == 2 and "60 rounds" in row["title"]


def test_latency_charts_skip_trials_without_samples(sample_record: RunRecord) -> None:
    trials = tuple(
        replace(t, details={}) if t.method == "fp32" else t for t in sample_record.trials
    )
    b1 = _model(build_view(replace(sample_record, trials=trials)), "mlp")["latency"][0]
    assert len(b1["rows"]) == 4
    bare = tuple(replace(t, details={}) for t in sample_record.trials)
    assert _model(build_view(replace(sample_record, trials=bare)), "mlp")["latency"] == []


def test_per_layer_error_of_the_worst_trials(sample_record: RunRecord) -> None:
    mlp = _model(build_view(sample_record), "mlp")
    worst = mlp["layers"]
    # lowest per-layer SQNR first; fp32 trials have no breakdown; at most three
    assert [w["id"] for w in worst] == [
        "mlp-ptq-w4a8-onnxruntime",
        "mlp-ptq-w4a8-torch",
        "mlp-ptq-w8a8-onnxruntime",
    ]
    first = worst[0]
    assert [r["layer"] for r in first["rows"]] == ["net.7", "net.5", "net.3", "net.1"]
    assert first["columns"] == ["mse", "SQNR dB", "max |err|", "cosine"]
    assert first["rows"][0]["cells"][1]["text"] == "26.9"  # 25.4 dB output, +1.5 dB
    bars = first["chart"]["bars"]
    assert len(bars) == 4 and all(b["w"] > 0 and math.isfinite(b["x"]) for b in bars)
    assert [b["w"] for b in bars] == sorted(b["w"] for b in bars)  # worst (shortest) first
    assert first["run_id"] and first["run_link"] == ""  # a file: store has no UI address


def test_malformed_per_layer_rows_do_not_break_the_page(sample_record: RunRecord) -> None:
    trial = replace(
        sample_record.trials[2],
        details={
            "per_layer": [{"layer": "a", "sqnr_db": "n/a"}, "junk", {"layer": "b", "sqnr_db": 12.0}]
        },
    )
    view = build_view(replace(sample_record, trials=(trial,)))
    rows = view["models"][0]["layers"][0]["rows"]
    assert [r["layer"] for r in rows] == ["a", "b"] and rows[0]["cells"][1]["text"] == "—"


def test_an_empty_record_renders() -> None:
    record = RunRecord(experiment={"name": "empty"}, created="2025-01-01T00:00:00+00:00", env={})
    assert "The record holds no environment." in render_html(record)


# --- escaping --------------------------------------------------------------------------


def test_user_strings_are_escaped(sample_record: RunRecord) -> None:
    html = render_html(sample_record)
    assert "<script>alert" not in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;CPU&lt;/b&gt;" in html  # the failure reason
    assert html.count("<script") == 1  # only the page's own inline script


def test_write_html_is_one_self_contained_file(sample_record, tmp_path: Path) -> None:
    path = write_html(sample_record, tmp_path / "out" / "report.html")
    html = path.read_text()
    assert path == tmp_path / "out" / "report.html"
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", html)
    assert "<link" not in html and "@import" not in html
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temporary left


# --- in a real browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium driven by Playwright; skips when either is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is missing (pip install playwright)"
    )
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser: Any, path: Path) -> tuple[Any, dict[str, list[str]], float]:
    """Open ``path``; returns the page, its console errors/page errors/requests, load seconds."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    seen: dict[str, list[str]] = {"console": [], "errors": [], "requests": [], "dialogs": []}
    page.on("console", lambda m: seen["console"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    start = time.perf_counter()
    page.goto(path.as_uri(), wait_until="load")
    return page, seen, time.perf_counter() - start


def _column(page: Any, table: str, header: str) -> list[str]:
    headers = [h.strip() for h in page.locator(f"#{table} thead th").all_inner_texts()]
    return page.eval_on_selector_all(
        f"#{table} tbody tr",
        "(rows, i) => rows.map(r => r.cells[i].dataset.value)",
        headers.index(header),
    )


def test_page_in_chromium(browser, sample_record: RunRecord, tmp_path: Path) -> None:
    path = write_html(sample_record, tmp_path / "report.html")
    page, seen, _ = _open(browser, path)
    assert seen["console"] == [] and seen["errors"] == [] and seen["dialogs"] == []
    assert seen["requests"] == [path.as_uri()]

    before = _column(page, "model-0-table", "compression")
    page.locator("#model-0-table thead th", has_text="compression").click()
    ascending = _column(page, "model-0-table", "compression")
    page.locator("#model-0-table thead th", has_text="compression").click()
    descending = _column(page, "model-0-table", "compression")
    assert ascending != before
    assert [float(v) for v in ascending] == sorted(float(v) for v in before)
    assert descending == ascending[::-1]

    search = page.locator("input[data-filter='model-0-table']")
    search.fill("w4a8")
    assert page.locator("#model-0-table tbody tr:visible").count() == 2
    search.fill("")
    assert page.locator("#model-0-table tbody tr:visible").count() == 6

    # 2 scatter charts, 2 latency distributions and 3 per-layer charts per model
    charts = page.locator("figure.chart svg")
    assert charts.count() == 14
    for i in range(charts.count()):
        assert charts.nth(i).locator("circle, rect").count() > 0
    boxes = page.locator("#model-0 g.dist")
    assert boxes.count() == 12 and boxes.first.locator("rect.box").count() == 1
    assert boxes.first.locator("circle.dot").count() == 60
    assert page.locator("#model-0 g.layer rect.bar").count() == 12
    box = boxes.first.locator("rect.box").bounding_box()
    assert box["width"] > 1 and box["height"] > 1  # really drawn, not collapsed

    boxes.first.click()  # a distribution row leads to its trial's table row
    page.wait_for_selector("#model-0-table tr.flash")

    shot = page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    if artifacts := os.environ.get("QATBENCH_TEST_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "report.png", Path(artifacts) / "report.png")
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    page.close()


def test_thirty_trials_render_small_and_load_fast(browser, tmp_path: Path) -> None:
    record = _many_trials()
    assert len(record.trials) == 30
    path = write_html(record, tmp_path / "report.html")
    assert path.stat().st_size < 5 * 1024 * 1024
    page, seen, seconds = _open(browser, path)
    assert seconds < 2.0
    assert seen["errors"] == [] and page.locator("figure.chart svg .mark circle").count() == 60
    assert page.locator("g.dist").count() == 60 and page.locator("g.layer").count() > 0
    page.close()


# --- what a reader sees first (issue 24) -------------------------------------------------


def test_quality_card_names_the_best_quantized_accuracy_and_its_change(sample_record) -> None:
    quality = _model(build_view(_in_percent(sample_record)), "mlp")["best"]["quality"]
    accuracies = {
        t.id: t.metrics["accuracy"] * 100
        for t in sample_record.trials
        if t.model == "mlp" and t.method != "fp32" and t.ok and "accuracy" in t.metrics
    }
    best = max(accuracies, key=lambda k: accuracies[k])
    assert quality["id"] == best and quality["title"] == "best accuracy (quantized)"
    assert quality["text"] == f"{accuracies[best]:.2f}%"
    assert quality["delta"].startswith("Δ ") and "vs fp32" in quality["delta"]


def test_exact_sqnr_is_shown_as_exact_not_its_cap(sample_record) -> None:
    trials = tuple(
        replace(t, metrics={**t.metrics, "sqnr_db": 400.0}) if t.method == "fp32" else t
        for t in sample_record.trials
    )
    mlp = _model(build_view(replace(sample_record, trials=trials)), "mlp")
    cell = _cell(mlp, "mlp-fp32-fp32-torch", "sqnr_db")
    assert (cell["text"], cell["value"]) == ("exact", "400.0")  # still sorts as the highest
    assert _cell(mlp, "mlp-ptq-w8a8-torch", "sqnr_db")["text"] != "exact"


def test_trials_at_the_same_point_are_spread_apart(sample_record) -> None:
    source = next(t for t in sample_record.trials if t.id == "mlp-ptq-w8a8-torch")
    twin = replace(source, id="mlp-ptq-w8a8-twin", runtime="onnxruntime")
    record = replace(sample_record, trials=(*sample_record.trials, twin))
    (chart, _) = _model(build_view(record), "mlp")["charts"]
    marks = {m["anchor"]: m for m in chart["marks"]}
    page_anchors = {t.id: f"trial-{i}" for i, t in enumerate(record.trials)}
    a, b = marks[page_anchors[source.id]], marks[page_anchors[twin.id]]
    assert math.dist((a["cx"], a["cy"]), (b["cx"], b["cy"])) >= 8  # both visible
    assert "one of 2 trials at the same point" in a["title"]
    positions = [(m["cx"], m["cy"]) for m in chart["marks"]]
    assert len(set(positions)) == len(positions)  # no mark sits exactly on another


def test_a_linear_axis_has_a_minimum_span() -> None:
    from qatbench.report.svg import linear_domain

    lo, hi = linear_domain([0.99999, 1.0])
    assert hi - lo >= 0.02 * 0.99 and lo < 0.99999 and hi > 1.0
    lo, hi = linear_domain([1.0, 3.0])  # a real spread keeps its tight padding
    assert (round(lo, 2), round(hi, 2)) == (0.84, 3.16)


def test_quality_columns_are_in_view_at_1400_px(browser, sample_record, tmp_path: Path) -> None:
    """Done-when: at 1400 px each trial's accuracy and error show without scrolling."""
    path = write_html(_in_percent(sample_record), tmp_path / "report.html")
    page, seen, _ = _open(browser, path)  # a 1400 x 900 viewport
    assert seen["errors"] == []
    for table in ("model-0-table", "model-1-table"):
        headers = [h.strip() for h in page.locator(f"#{table} thead th").all_inner_texts()]
        assert len(headers) > 20  # the table is as wide as before: the order makes the point
        for header in ("accuracy %", "mse", "SQNR dB"):
            index = headers.index(header)
            rights = page.eval_on_selector_all(
                f"#{table} tr",
                "(rows, i) => rows.map(r => r.cells[i].getBoundingClientRect().right)",
                index,
            )
            assert rights and max(rights) <= 1400, (table, header, max(rights))
    assert page.evaluate("window.scrollX") == 0
    page.screenshot(path=str(tmp_path / "report-1400.png"))
    if artifacts := os.environ.get("QATBENCH_TEST_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "report-1400.png", Path(artifacts) / "report-1400.png")
    page.close()


def test_a_long_trial_label_is_cut_in_the_middle_to_fit_the_latency_chart() -> None:
    from qatbench.report.distributions import LABEL_CHARS, fit_label

    short = fit_label("torchao_int8_dynamic w8a8 · onnxruntime")
    assert len(short) == LABEL_CHARS and "\u2026" in short
    assert short.startswith("torchao_int8") and short.endswith("onnxruntime")
    assert fit_label("fp32 · torch") == "fp32 · torch"
