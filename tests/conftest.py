"""Shared fixtures."""

from __future__ import annotations

import gc
import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from data import durations
from data.fast_mlflow import mlflow_template

from qatbench.results import RunRecord, TrialFailure, TrialResult

HOSTILE_MODEL = "<script>alert(1)</script>"

# What a trial imports in the test process: the worker forkserver's preload (sweep/executor.py).
TRIAL_IMPORTS = ("torch", "onnxruntime", "sklearn.datasets", "qatbench.trial.lifecycle")
_TEMPLATE_DIR: list[str] = []  # the folder this process made for the session, if any


def pytest_configure(config: pytest.Config) -> None:
    """New SQLite MLflow stores start from one migrated template database (see
    data/fast_mlflow/mlflow_template.py), here and in every subprocess of the session: the
    first process of the session (the xdist controller) names a folder for it in the
    environment its workers and their subprocesses inherit."""
    if not os.environ.get(mlflow_template.ENV):
        folder = tempfile.mkdtemp(prefix="qatbench-mlflow-template-")
        _TEMPLATE_DIR.append(folder)
        os.environ[mlflow_template.ENV] = folder
        paths = [str(mlflow_template.HERE), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    mlflow_template.activate()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slowest modules first (data/durations.py), each module's tests together and in
    their own order, so xdist's loadscope hands the long modules out first."""
    modules = {item.nodeid.split("::")[0] for item in items}
    rank = {module: durations.MODULE_S.get(module, durations.DEFAULT_S) for module in modules}
    items.sort(key=lambda item: -rank[item.nodeid.split("::")[0]])


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap() -> None:
    """Before each module: collect, then freeze what is still alive (imports of torch,
    onnxruntime, mlflow, earlier modules' fixtures: hundreds of thousands of objects) out
    of the cyclic collector's view. Trials run in the test process call gc.collect() after
    each phase and before timing, as in a worker (which freezes its forkserver's imports
    the same way); each call then scans only what the module allocates, not every module
    object of the process: 0.15-0.3 s less per call, seconds per in-process trial.

    Where collection imported torch (a session that runs trials), the libraries a trial
    imports (the worker forkserver's preload) are imported first, so that they are frozen
    too even in the first module of a worker."""
    if "torch" in sys.modules:
        for name in TRIAL_IMPORTS:
            importlib.import_module(name)
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _TEMPLATE_DIR:
        shutil.rmtree(folder, ignore_errors=True)


def _trial(model: str, method: str, bits: str, runtime: str, **metrics: float) -> TrialResult:
    """A finished trial with a stable fake MLflow run id derived from its trial id."""
    trial_id = f"{model}-{method}-{bits}-{runtime}"
    return TrialResult(
        id=trial_id,
        model=model,
        method=method,
        bits=bits,
        runtime=runtime,
        status="finished",
        metrics=metrics,
        phases={"build": 0.02, "convert": 0.11, "measure": 2.4},
        params={"threads": 1},
        mlflow_run_id=hashlib.md5(trial_id.encode()).hexdigest(),
    )


def _speed(n: int, latency_ms: float, speedup: float, half_ci: float) -> dict[str, float]:
    """Latency, throughput and paired speed-up (with its 95% interval) at batch ``n``."""
    return {
        f"latency_p50_ms_b{n}": latency_ms,
        f"latency_p90_ms_b{n}": latency_ms * 1.08,
        f"throughput_per_s_b{n}": n * 1000.0 / latency_ms,
        f"speedup_vs_fp32_b{n}": speedup,
        f"speedup_ci_low_b{n}": speedup - half_ci,
        f"speedup_ci_high_b{n}": speedup + half_ci,
    }


def _mlp_trials() -> list[TrialResult]:
    """The digits MLP: fp32 and ptq w8a8/w4a8 on torch and onnxruntime, all finished."""
    m = "mlp"
    return [
        _trial(
            m,
            "fp32",
            "fp32",
            "torch",
            size_bytes=44_328,
            compression_ratio=1.0,
            weight_bytes=42_240,
            **_speed(1, 0.041, 1.0, 0.02),
            **_speed(64, 0.162, 1.0, 0.01),
            peak_rss_bytes=312_000_000,
            mse=0.0,
            max_abs_error=0.0,
            cosine=1.0,
            accuracy=0.9722,
            accuracy_delta_vs_fp32=0.0,
            onnx_size_bytes=43_900,
            onnx_parity_max_abs=2.4e-7,
            int_op_fraction=0.0,
        ),
        _trial(
            m,
            "fp32",
            "fp32",
            "onnxruntime",
            size_bytes=43_900,
            compression_ratio=1.01,
            weight_bytes=42_240,
            **_speed(1, 0.018, 2.28, 0.07),
            **_speed(64, 0.101, 1.6, 0.04),
            peak_rss_bytes=298_000_000,
            mse=3.1e-14,
            max_abs_error=4.8e-7,
            sqnr_db=131.2,
            cosine=1.0,
            accuracy=0.9722,
            accuracy_delta_vs_fp32=0.0,
            onnx_size_bytes=43_900,
            onnx_parity_max_abs=2.4e-7,
            int_op_fraction=0.0,
        ),
        _trial(
            m,
            "ptq",
            "w8a8",
            "torch",
            size_bytes=12_050,
            compression_ratio=3.68,
            weight_bytes=11_200,
            **_speed(1, 0.089, 0.46, 0.02),
            **_speed(64, 0.35, 0.46, 0.01),
            peak_rss_bytes=318_000_000,
            mse=2.1e-4,
            max_abs_error=0.061,
            sqnr_db=38.4,
            cosine=0.99993,
            accuracy=0.9705,
            accuracy_delta_vs_fp32=-0.0017,
            onnx_size_bytes=14_800,
            onnx_parity_max_abs=3.1e-6,
            int_op_fraction=0.0,
        ),
        _trial(
            m,
            "ptq",
            "w8a8",
            "onnxruntime",
            size_bytes=12_300,
            compression_ratio=3.60,
            weight_bytes=11_200,
            **_speed(1, 0.015, 2.71, 0.12),
            **_speed(64, 0.058, 2.79, 0.05),
            peak_rss_bytes=301_000_000,
            mse=2.4e-4,
            max_abs_error=0.066,
            sqnr_db=37.9,
            cosine=0.99991,
            accuracy=0.9705,
            accuracy_delta_vs_fp32=-0.0017,
            onnx_size_bytes=12_300,
            onnx_parity_max_abs=1.9e-6,
            int_op_fraction=0.86,
        ),
        _trial(
            m,
            "ptq",
            "w4a8",
            "torch",
            size_bytes=6_900,
            compression_ratio=6.42,
            weight_bytes=5_600,
            **_speed(1, 0.095, 0.43, 0.02),
            **_speed(64, 0.37, 0.44, 0.01),
            peak_rss_bytes=318_500_000,
            mse=3.9e-3,
            max_abs_error=0.29,
            sqnr_db=25.7,
            cosine=0.9987,
            accuracy=0.9611,
            accuracy_delta_vs_fp32=-0.0111,
            onnx_size_bytes=14_800,
            onnx_parity_max_abs=5.2e-6,
            int_op_fraction=0.0,
        ),
        _trial(
            m,
            "ptq",
            "w4a8",
            "onnxruntime",
            size_bytes=7_150,
            compression_ratio=6.2,
            weight_bytes=5_600,
            **_speed(1, 0.0195, 2.1, 0.15),
            **_speed(64, 0.071, 2.28, 0.06),
            peak_rss_bytes=302_000_000,
            mse=4.1e-3,
            max_abs_error=0.31,
            sqnr_db=25.4,
            cosine=0.9986,
            accuracy=0.9594,
            accuracy_delta_vs_fp32=-0.0128,
            onnx_size_bytes=7_150,
            onnx_parity_max_abs=4.4e-6,
            int_op_fraction=0.71,
        ),
    ]


def _latency_samples(trial: TrialResult, rounds: int = 60) -> dict[str, Any]:
    """Per-call ms of paired rounds around the trial's medians, seeded by its id: lognormal
    noise (cv about 6%) and the fp32 baseline ``speedup`` times slower."""
    seed = int(hashlib.md5(trial.id.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    samples = {}
    for name, value in trial.metrics.items():
        if name.startswith("latency_p50_ms_b"):
            n = name.rsplit("_b", 1)[1]
            speedup = trial.metrics.get(f"speedup_vs_fp32_b{n}", 1.0)
            noise = rng.lognormal(0.0, 0.06, size=(2, rounds))
            samples[f"b{n}"] = {
                "candidate_ms": (value * noise[0]).tolist(),
                "fp32_ms": (value * speedup * noise[1]).tolist(),
            }
    return samples


def _per_layer(trial: TrialResult, layers: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per-layer error rows, worst SQNR first, scaled from the trial's output mse."""
    mse = trial.metrics.get("mse", 0.0)
    rows = [
        {
            "layer": name,
            "type": kind,
            "mse": mse * (0.3 + 0.2 * i),
            "max_abs_error": 0.05 * (i + 1),
            "sqnr_db": trial.metrics.get("sqnr_db", 40.0) + 1.5 * (len(layers) - i),
            "cosine": 1.0 - mse * (i + 1),
        }
        for i, (name, kind) in enumerate(layers)
    ]
    return sorted(rows, key=lambda r: r["sqnr_db"])


def _with_details(trials: list[TrialResult], layers: list[tuple[str, str]]) -> list[TrialResult]:
    """Finished trials get latency samples; quantized ones a per-layer error breakdown too."""
    out = []
    for t in trials:
        if t.ok:
            details: dict[str, Any] = {"latency_samples": _latency_samples(t)}
            if t.method != "fp32":
                details["per_layer"] = _per_layer(t, layers)
            t = replace(t, details=details)
        out.append(t)
    return out


MLP_LAYERS = [
    ("net.1", "QuantizedLinear"),
    ("net.3", "QuantizedLinear"),
    ("net.5", "QuantizedLinear"),
    ("net.7", "QuantizedLinear"),
]
HOSTILE_LAYERS = [
    ("blocks.0.attn", "QuantizedLinear"),
    ("blocks.0.mlp", "QuantizedLinear"),
    ("<img src=x onerror=alert(2)>", "QuantizedLinear"),
]


def _hostile_trials() -> list[TrialResult]:
    """A small transformer whose name is markup; its w4a8 onnxruntime conversion fails."""
    m = HOSTILE_MODEL
    failed = TrialResult(
        id=f"{m}-ptq-w4a8-onnxruntime",
        model=m,
        method="ptq",
        bits="w4a8",
        runtime="onnxruntime",
        status="failed",
        phases={"build": 0.05},
        error=TrialFailure(phase="convert", reason="no int4 MatMulInteger kernel for <b>CPU</b>"),
        mlflow_run_id=hashlib.md5(b"failed").hexdigest(),
    )
    return [
        _trial(
            m,
            "fp32",
            "fp32",
            "torch",
            size_bytes=1_652_400,
            compression_ratio=1.0,
            weight_bytes=1_638_400,
            **_speed(1, 0.61, 1.0, 0.03),
            **_speed(16, 2.9, 1.0, 0.02),
            peak_rss_bytes=402_000_000,
            mse=0.0,
            max_abs_error=0.0,
            cosine=1.0,
            accuracy=0.8813,
            accuracy_delta_vs_fp32=0.0,
        ),
        _trial(
            m,
            "fp32",
            "fp32",
            "onnxruntime",
            size_bytes=1_655_100,
            compression_ratio=0.998,
            weight_bytes=1_638_400,
            **_speed(1, 0.33, 1.85, 0.09),
            **_speed(16, 2.1, 1.38, 0.05),
            peak_rss_bytes=377_000_000,
            mse=8.2e-13,
            max_abs_error=3.6e-6,
            sqnr_db=112.4,
            cosine=1.0,
            accuracy=0.8813,
            accuracy_delta_vs_fp32=0.0,
            onnx_size_bytes=1_655_100,
            onnx_parity_max_abs=3.6e-6,
        ),
        _trial(
            m,
            "ptq",
            "w8a8",
            "torch",
            size_bytes=431_800,
            compression_ratio=3.83,
            weight_bytes=409_600,
            **_speed(1, 1.24, 0.49, 0.03),
            **_speed(16, 5.7, 0.51, 0.02),
            peak_rss_bytes=410_000_000,
            mse=6.8e-4,
            max_abs_error=0.12,
            sqnr_db=33.1,
            cosine=0.99976,
            accuracy=0.8797,
            accuracy_delta_vs_fp32=-0.0016,
        ),
        _trial(
            m,
            "ptq",
            "w8a8",
            "onnxruntime",
            size_bytes=446_200,
            compression_ratio=3.70,
            weight_bytes=409_600,
            **_speed(1, 0.22, 2.77, 0.16),
            **_speed(16, 1.1, 2.64, 0.08),
            peak_rss_bytes=381_000_000,
            mse=7.3e-4,
            max_abs_error=0.13,
            sqnr_db=32.8,
            cosine=0.99974,
            accuracy=0.8790,
            accuracy_delta_vs_fp32=-0.0023,
            onnx_size_bytes=446_200,
            onnx_parity_max_abs=8.1e-6,
            int_op_fraction=0.79,
        ),
        _trial(
            m,
            "ptq",
            "w4a8",
            "torch",
            size_bytes=226_900,
            compression_ratio=7.28,
            weight_bytes=204_800,
            **_speed(1, 1.31, 0.47, 0.03),
            **_speed(16, 6.0, 0.48, 0.02),
            peak_rss_bytes=411_000_000,
            mse=9.7e-3,
            max_abs_error=0.58,
            sqnr_db=21.6,
            cosine=0.9966,
            accuracy=0.8612,
            accuracy_delta_vs_fp32=-0.0201,
        ),
        failed,
    ]


def _env() -> dict[str, Any]:
    """A machine fingerprint as :func:`qatbench.measure.env.fingerprint` records it."""
    return {
        "cpu_model": "Intel(R) Xeon(R) Platinum 8480+",
        "cpu_flags_relevant": ["avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"],
        "cpu_count_logical": 2,
        "cpu_count_physical": 1,
        "os": "Linux-6.1.0-x86_64-with-glibc2.36",
        "python": "3.11.2",
        "versions": {
            "torch": "2.13.0",
            "onnx": "1.19.0",
            "onnxruntime": "1.23.1",
            "numpy": "2.3.4",
            "mlflow": "3.5.1",
            "qatbench": "0.1.0",
        },
        "hostname": "bench-01",
        "git_commit": "aa86f92e0c1d4b1b9f6f2a7a3c0f51d0b8c3e2f1",
        "git_dirty": False,
        "threads": 1,
        "thread_env": {"OMP_NUM_THREADS": "1"},
    }


@pytest.fixture
def sample_record() -> RunRecord:
    """Two models (one named ``<script>alert(1)</script>``), fp32 + ptq w8a8/w4a8 on torch
    and onnxruntime with realistic metrics, and one trial that failed in phase ``convert``.

    Finished trials carry 60 paired latency rounds per batch size in
    ``details["latency_samples"]``; quantized ones a per-layer breakdown in
    ``details["per_layer"]`` (one hostile layer name)."""
    return RunRecord(
        experiment={
            "name": "quickstart",
            "source": "experiments/quickstart.yaml",
            "spec": {
                "name": "quickstart",
                "methods": ["fp32", "ptq"],
                "bits": ["w8a8", "w4a8"],
                "runtimes": ["torch", "onnxruntime"],
            },
        },
        created="2025-11-29T02:15:00+00:00",
        env=_env(),
        trials=(
            *_with_details(_mlp_trials(), MLP_LAYERS),
            *_with_details(_hostile_trials(), HOSTILE_LAYERS),
        ),
        tracking={"uri": "file:///work/main/mlruns", "experiment_id": "417263801"},
    )


ROUNDS = 40
NOISE = 0.05  # lognormal sigma: about 5% spread per round


def with_samples(
    record: RunRecord, seed: int, scale: float = 1.0, base: RunRecord | None = None
) -> RunRecord:
    """``record`` with fresh noisy samples at every batch size of its finished trials, and
    latency, throughput and speed-up metrics recomputed from them.

    The candidate's per-call times are ``scale`` times those of ``base`` (default: the real
    trial's medians) times lognormal noise; the fp32 rounds keep their scale.
    """
    rng = np.random.default_rng(seed)
    trials = []
    for trial in record.trials:
        if not trial.ok:
            trials.append(trial)
            continue
        ref = next(t for t in (base or record).trials if t.id == trial.id)
        metrics, samples = dict(trial.metrics), {}
        for key, bucket in ref.details["latency_samples"].items():
            n = int(key[1:])
            cand = (
                np.asarray(bucket["candidate_ms"])
                if base
                else np.full(ROUNDS, np.median(bucket["candidate_ms"]))
            )
            cand = cand * scale * rng.lognormal(0.0, NOISE, cand.size)
            fp32 = np.median(bucket["fp32_ms"]) * rng.lognormal(0.0, NOISE, cand.size)
            samples[key] = {"candidate_ms": cand.tolist(), "fp32_ms": fp32.tolist()}
            median = float(np.median(cand))
            metrics[f"latency_p50_ms_b{n}"] = median
            metrics[f"latency_p90_ms_b{n}"] = float(np.percentile(cand, 90))
            metrics[f"throughput_per_s_b{n}"] = n / median * 1e3
            metrics[f"speedup_vs_fp32_b{n}"] = float(np.median(fp32)) / median
        details = {**trial.details, "latency_samples": samples}
        trials.append(replace(trial, metrics=metrics, details=details))
    return replace(record, trials=tuple(trials))


@pytest.fixture(scope="session")
def resample() -> Any:
    """:func:`with_samples`: fresh synthetic latency samples in a real record's structure."""
    return with_samples


@pytest.fixture(scope="session")
def real_record(tmp_path_factory: pytest.TempPathFactory) -> RunRecord:
    """A RunRecord as ``qatbench run`` writes it, from trials really run in this process: ptq
    w8a8 on torch for a 784-32-10 MLP (20 timed rounds at batch 1 and 4, per-layer error)
    and a model whose factory raises, which fails in ``build``. Takes seconds."""
    import torch

    from qatbench.measure.env import fingerprint
    from qatbench.spec.schema import validate_experiment
    from qatbench.trial.lifecycle import run_trial

    data = {
        "name": "tiny_real",
        "models": [
            {"name": "mlp", "options": {"hidden": [32]}},
            {"name": "broken", "factory": "builtins:len"},
        ],
        "methods": [{"name": "ptq", "bits": ["w8a8"]}],
        "runtimes": ["torch"],
        "data": {
            "dataset": "digits",
            "pretrain_epochs": 1,
            "eval_samples": 64,
            "calibration_samples": 32,
        },
        "measure": {
            "batch_sizes": [1, 4],
            "max_time_s": 0.1,
            "min_rounds": 20,
            "warmup_s": 0.01,
            "threads": 1,
        },
    }
    spec = validate_experiment(data, source="tiny-real.yaml")
    out = tmp_path_factory.mktemp("real-trials")
    results = []
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QATBENCH_CACHE", str(out / "cache"))
        try:
            for trial in spec.expand():
                with torch.random.fork_rng(devices=[]):
                    results.append(run_trial(trial, out / trial.id))
        finally:
            torch.set_num_threads(threads)
    return RunRecord(
        experiment={
            "name": spec.name,
            "source": "tiny-real.yaml",
            "spec": spec.model_dump(mode="json"),
        },
        created="2025-11-29T02:15:00+00:00",
        env=fingerprint(threads=1),
        trials=tuple(results),
        tracking={
            "uri": "sqlite:////tmp/mlruns/mlflow.db",
            "experiment_id": "1",
            "experiment": spec.name,
        },
    )
