"""Every timing repeat of a trial times fresh instances: copies of fp32 and of the torch
candidate, or a new onnxruntime session of the exported graph (see measure/timing.py)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import qatbench.trial.measure_phase as tm
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.spec.schema import TrialSpec, validate_experiment
from qatbench.trial.lifecycle import run_trial

REPEATS = 3


def _trial(runtime: str) -> TrialSpec:
    spec = validate_experiment(
        {
            "name": "fresh",
            "models": [{"name": "linear", "options": {"in_features": 32, "out_features": 8}}],
            "methods": [{"name": "ptq", "bits": ["w8a8"]}],
            "runtimes": [runtime],
            "data": {"dataset": "synthetic", "eval_samples": 16, "calibration_samples": 16},
            "measure": {
                "batch_sizes": [1, 4],
                "max_time_s": 0.01,
                "min_rounds": 3,
                "warmup_s": 0,
                "repeats": REPEATS,
            },
        },
        source="fresh.yaml",
    )
    (trial,) = spec.expand()
    return trial


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[Any]]]:
    """The pairs each repeat made, kept alive here so their identities can be compared."""
    seen: list[list[Any]] = []
    real = tm.time_pairs

    def spy(pairs: Any, settings: Any) -> Any:
        def renew(repeat: int) -> Any:
            seen.append(pairs(repeat))
            return seen[-1]

        return real(renew, settings)

    monkeypatch.setattr(tm, "time_pairs", spy)
    threads = torch.get_num_threads()
    yield seen
    torch.set_num_threads(threads)


def test_torch_trials_time_new_copies_of_fp32_and_the_candidate_in_every_repeat(
    made: list[list[Any]], tmp_path: Path
) -> None:
    result = run_trial(_trial("torch"), tmp_path)
    assert result.status == "finished", result.error
    assert [len(pairs) for pairs in made] == [2] * REPEATS  # batch sizes 1 and 4
    fp32 = [pairs[0][0].func for pairs in made]
    candidates = [pairs[0][1].func for pairs in made]
    assert len({id(m) for m in fp32 + candidates}) == 2 * REPEATS
    # the batch sizes of one repeat share its instances
    assert all(pairs[1][0].func is pairs[0][0].func for pairs in made)
    assert all(pairs[1][1].func is pairs[0][1].func for pairs in made)
    assert type(candidates[0].linear) is not type(fp32[0].linear)  # quantized, not fp32 twice
    x = made[0][0][0].args[0]
    with torch.inference_mode():
        for copies in (fp32, candidates):
            assert all(torch.equal(m(x), copies[0](x)) for m in copies)
    assert "timed_candidate" not in result.details
    assert result.details["latency_samples"]["b1"]["repeat_of_round"][-1] == REPEATS - 1


def test_onnxruntime_trials_open_a_new_session_for_every_repeat(
    made: list[list[Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Path] = []
    real = ortrt.make_session

    def counting(path: Path, threads: int) -> Any:
        opened.append(Path(path))
        return real(path, threads)

    monkeypatch.setattr(ortrt, "make_session", counting)
    result = run_trial(_trial("onnxruntime"), tmp_path)
    assert result.status == "finished", result.error
    # one for the export's checks and evaluation, then one per repeat, all of the artifact
    assert opened == [Path(result.artifacts["onnx"])] * (1 + REPEATS)
    assert len(made) == REPEATS


class _Uncopyable(torch.nn.Linear):
    tries = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        _Uncopyable.tries += 1
        raise TypeError("holds a handle that cannot be copied")


def test_a_candidate_that_cannot_be_copied_is_timed_as_it_is_with_a_note() -> None:
    candidate = _Uncopyable(4, 2)
    subjects = tm.Subjects(fp32=torch.nn.Linear(4, 2), candidate=candidate)
    state = tm.TrialState()
    _Uncopyable.tries = 0
    fresh = tm.fresh_instances(_trial("torch"), state, subjects)
    for _ in range(3):  # three repeats
        fp32_copy, candidate_call = fresh()
        assert fp32_copy is not subjects.fp32
        timed = candidate_call(torch.zeros(1, 4))
        assert isinstance(timed, functools.partial) and timed.func is candidate
    assert state.details["timed_candidate"] == (
        "the same instance: copy failed (holds a handle that cannot be copied)"
    )
    assert _Uncopyable.tries == 1  # a failed copy is not tried again in every repeat


def test_a_fresh_session_replaces_the_one_before_it(tmp_path: Path) -> None:
    """A trial holds one session of its graph at a time: the evaluation's session is
    closed when the first repeat's opens, and the trial's call runs the newest."""
    import weakref

    from qatbench.runtimes.onnx_export import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).eval()
    path = export_onnx(model, (torch.zeros(1, 8),), tmp_path / "model.onnx")
    runtime = ortrt.OnnxRuntime(1)
    loaded = runtime.load(path, [])
    first = weakref.ref(loaded.handle.session)
    again = runtime.fresh(path, loaded)
    assert again is loaded
    assert first() is None  # closed, not kept beside the new one
    x = torch.randn(2, 8)
    with torch.inference_mode():
        want = model(x)
    assert torch.allclose(loaded.fn(x), want, atol=1e-5)
    assert torch.allclose(torch.from_numpy(loaded.bind(x)()[0]), want, atol=1e-5)
