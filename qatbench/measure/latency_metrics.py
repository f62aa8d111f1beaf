"""A batch size's latency metrics from its timed rounds: plain data in, metrics out.

The rounds are ``details["latency_samples"]["b{N}"]`` of a trial: per-call milliseconds of
the candidate and of the fp32 baseline, paired round by round, and the repeat each round
was timed in. The measure phase computes a trial's metrics with this, and so does pooling
the passes of a trial (:mod:`qatbench.measure.passes`), so both give the same numbers for
the same rounds.
"""

from __future__ import annotations

from typing import Any

from qatbench.measure.stats import paired_ratio_of_medians, summarize

DRIFT_WARNING = 0.25  # max/min of the per-repeat speed-ups, minus 1
_WARNING_STARTS = ("unstable timing at batch", "speed-up at batch")


def is_timing_warning(text: str) -> bool:
    """Whether ``text`` is one of the warnings :func:`batch_metrics` gives."""
    return text.startswith(_WARNING_STARTS)


def batch_metrics(n: int, rounds: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """Metrics (``latency_p50_ms_b{n}``, ``speedup_vs_fp32_b{n}``, ...) and warnings.

    ``rounds`` holds ``candidate_ms``, ``fp32_ms``, ``repeat_of_round`` and
    ``speedup_per_repeat``; on ``torch_compile`` also ``fp32_compiled_ms``,
    ``compiled_candidate_ms`` and ``compiled_repeat_of_round`` for the pair with the
    compiled fp32 model.
    """
    m: dict[str, float] = {}
    warnings: list[str] = []
    s = summarize(rounds["candidate_ms"])
    speedup = paired_ratio_of_medians(
        rounds["fp32_ms"], rounds["candidate_ms"], blocks=rounds["repeat_of_round"]
    )
    m[f"latency_p50_ms_b{n}"] = s.median
    m[f"latency_p90_ms_b{n}"] = s.p90
    m[f"latency_p99_ms_b{n}"] = s.p99
    m[f"latency_ci_low_ms_b{n}"] = s.median_ci_low
    m[f"latency_ci_high_ms_b{n}"] = s.median_ci_high
    m[f"fp32_latency_p50_ms_b{n}"] = summarize(rounds["fp32_ms"]).median
    m[f"throughput_per_s_b{n}"] = n / (s.median / 1e3)
    m[f"speedup_vs_fp32_b{n}"] = speedup.value
    m[f"speedup_ci_low_b{n}"] = speedup.ci_low
    m[f"speedup_ci_high_b{n}"] = speedup.ci_high
    m[f"latency_cv_b{n}"] = s.cv
    if s.unstable:
        warnings.append(f"{_WARNING_STARTS[0]} {n}: cv {s.cv:.2f}, {s.outliers} outliers")
    per_repeat = rounds["speedup_per_repeat"]
    if len(per_repeat) > 1 and max(per_repeat) / min(per_repeat) - 1 > DRIFT_WARNING:
        warnings.append(
            f"{_WARNING_STARTS[1]} {n} moved between {min(per_repeat):.2f} and "
            f"{max(per_repeat):.2f} across {len(per_repeat)} repeats: the machine was busy, "
            f"read the interval [{speedup.ci_low:.2f}, {speedup.ci_high:.2f}]"
        )
    if "fp32_compiled_ms" in rounds:
        compiled = paired_ratio_of_medians(
            rounds["fp32_compiled_ms"],
            rounds["compiled_candidate_ms"],
            blocks=rounds["compiled_repeat_of_round"],
        )
        m[f"fp32_compiled_latency_p50_ms_b{n}"] = summarize(rounds["fp32_compiled_ms"]).median
        m[f"speedup_vs_fp32_compiled_b{n}"] = compiled.value
        m[f"speedup_vs_fp32_compiled_ci_low_b{n}"] = compiled.ci_low
        m[f"speedup_vs_fp32_compiled_ci_high_b{n}"] = compiled.ci_high
    return m, warnings
