"""A sweep's shared fp32 work: keyed by what it depends on, read instead of computed, and
gone with the sweep. (The real sweep in test_runner.py checks that trials read it.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from qatbench.spec.schema import TrialSpec, validate_experiment
from qatbench.trial.shared_fp32 import (
    CONVERTED_PREFIX,
    SHARED_ENV,
    Conversion,
    SharedFp32,
    built_model,
    fingerprint,
    shared_folder,
)


def _trial(threads: int = 1) -> TrialSpec:
    spec = validate_experiment(
        {
            "name": "shared",
            "models": ["mlp"],
            "methods": ["fp32", "ptq"],
            "measure": {"threads": threads},
        }
    )
    return spec.expand()[0]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


class _Counted:
    def __init__(self, value: torch.Tensor) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.value


@pytest.fixture
def shared_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(SHARED_ENV, str(tmp_path / "shared"))
    return tmp_path / "shared"


def test_a_second_build_of_the_same_model_reads_what_the_first_computed(
    shared_dir: Path,
) -> None:
    outputs = _Counted(torch.randn(3, 2))
    first = SharedFp32.of(_trial(), _model(0))
    assert torch.equal(first.reference_outputs(outputs), outputs.value)
    assert first.read == []
    second = SharedFp32.of(_trial(), _model(0))
    assert second.folder == first.folder
    assert torch.equal(second.reference_outputs(outputs), outputs.value)
    assert outputs.calls == 1
    assert second.read == ["reference_outputs"]


@pytest.mark.parametrize(
    "other",
    [
        lambda: SharedFp32.of(_trial(), _model(1)),  # other weights (a factory not seeded)
        lambda: SharedFp32.of(_trial(threads=2), _model(0)),  # other threads: sums in another order
    ],
)
def test_what_differs_from_the_first_build_computes_its_own(
    shared_dir: Path, other: object
) -> None:
    outputs = _Counted(torch.randn(3, 2))
    SharedFp32.of(_trial(), _model(0)).reference_outputs(outputs)
    assert callable(other)
    again = other()
    again.reference_outputs(outputs)
    assert outputs.calls == 2
    assert again.read == []


def test_graph_bytes_recorded_by_fp32_are_read_by_the_others(shared_dir: Path) -> None:
    fp32 = SharedFp32.of(_trial(), _model(0))
    fp32.record_graph_bytes(12345)
    other = SharedFp32.of(_trial(), _model(0))
    assert other.graph_bytes(lambda: pytest.fail("exported again")) == 12345
    assert other.read == ["graph_bytes"]


def test_without_a_shared_folder_everything_is_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHARED_ENV, raising=False)
    outputs = _Counted(torch.randn(3, 2))
    alone = SharedFp32.of(_trial(), _model(0))
    alone.reference_outputs(outputs)
    alone.reference_outputs(outputs)
    alone.record_graph_bytes(1)
    assert alone.graph_bytes(lambda: 7) == 7
    assert outputs.calls == 2
    assert alone.folder is None and alone.read == []


def test_the_fingerprint_sees_one_changed_weight() -> None:
    model = _model(0)
    before = fingerprint(model)
    assert fingerprint(_model(0)) == before
    with torch.no_grad():
        model[2].bias[0] += 1e-3
    assert fingerprint(model) != before


def test_the_shared_folder_goes_with_the_sweep(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    assert SHARED_ENV not in os.environ
    with shared_folder(folder):
        assert os.environ[SHARED_ENV] == str(folder.absolute())
        SharedFp32.of(_trial(), _model(0)).record_graph_bytes(1)
        assert any(folder.iterdir())
    assert not folder.exists()
    assert SHARED_ENV not in os.environ


class _Converts:
    """A conversion counted, of ``make()``'s model."""

    def __init__(self, make: object, by: str = "first-trial") -> None:
        self.make, self.by, self.calls = make, by, 0

    def __call__(self) -> Conversion:
        self.calls += 1
        assert callable(self.make)
        return Conversion(self.make(), {"alpha": 0.5}, self.by)


def _grid(
    runtimes: str = "[torch, onnxruntime]", bits: str = "[w4, w8]", **more: object
) -> list[TrialSpec]:
    """rtn on ``runtimes`` at ``bits``, as one sweep expands it."""
    spec = validate_experiment(
        {
            "name": "shared",
            "models": ["mlp"],
            "methods": [{"name": "rtn", "bits": yaml.safe_load(bits)}],
            "runtimes": yaml.safe_load(runtimes),
            **more,
        }
    )
    return spec.expand()


def test_a_converted_model_is_saved_once_and_loaded_by_the_other_runtimes(
    tmp_path: Path,
) -> None:
    trials = {t.id: t for t in _grid()}
    w4_torch, w4_ort = trials["mlp-rtn-w4-torch"], trials["mlp-rtn-w4-onnxruntime"]
    with shared_folder(tmp_path / "shared", list(trials.values())):
        convert = _Converts(lambda: _model(3))
        first = SharedFp32.of(w4_torch, _model(0)).converted(w4_torch, convert)
        other = SharedFp32.of(w4_ort, _model(0))
        second = other.converted(w4_ort, _Converts(lambda: pytest.fail("converted again")))
        assert convert.calls == 1
        assert other.read == ["converted_model"]
        assert second.by == "first-trial" and second.choices == {"alpha": 0.5}
        x = torch.randn(5, 8)
        assert torch.equal(second.model(x), first.model(x))
        # another bit-width is another conversion
        w8 = _Converts(lambda: _model(3))
        w8_ort = trials["mlp-rtn-w8-onnxruntime"]
        SharedFp32.of(w8_ort, _model(0)).converted(w8_ort, w8)
        assert w8.calls == 1
        assert len(list((tmp_path / "shared").glob(f"*/{CONVERTED_PREFIX}*.pt"))) == 2


def test_a_conversion_no_other_trial_loads_is_not_saved(tmp_path: Path) -> None:
    (trial,) = _grid(runtimes="[torch]", bits="[w4]")
    with shared_folder(tmp_path / "shared", [trial]):
        SharedFp32.of(trial, _model(0)).converted(trial, _Converts(lambda: _model(3)))
        assert not list((tmp_path / "shared").glob(f"*/{CONVERTED_PREFIX}*"))


class _Unpicklable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 2)
        self.hook = lambda x: x  # a lambda does not pickle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_a_model_that_does_not_pickle_is_converted_by_each_trial(tmp_path: Path) -> None:
    trials = _grid(bits="[w4]")
    convert = _Converts(_Unpicklable)
    with shared_folder(tmp_path / "shared", trials):
        for trial in trials:
            made = SharedFp32.of(trial, _model(0)).converted(trial, convert)
            assert isinstance(made.model, _Unpicklable)
        assert convert.calls == 2
        assert not list((tmp_path / "shared").glob("*/*.tmp"))


def test_a_saved_model_that_does_not_load_is_converted_again(tmp_path: Path) -> None:
    first, second = _grid(bits="[w4]")
    with shared_folder(tmp_path / "shared", [first, second]):
        SharedFp32.of(first, _model(0)).converted(first, _Converts(lambda: _model(3)))
        (saved,) = (tmp_path / "shared").glob(f"*/{CONVERTED_PREFIX}*.pt")
        saved.write_bytes(b"not a checkpoint")
        convert = _Converts(lambda: _model(3), by="second-trial")
        other = SharedFp32.of(second, _model(0))
        assert other.converted(second, convert).by == "second-trial"
        assert convert.calls == 1 and other.read == []


class _Exports:
    """An export counted: writes a graph and its data file."""

    def __init__(self, graph: Path) -> None:
        self.graph, self.calls = graph, 0

    def __call__(self) -> None:
        self.calls += 1
        self.graph.parent.mkdir(parents=True, exist_ok=True)
        self.graph.write_bytes(b"graph")
        self.graph.with_name("model.onnx.data").write_bytes(b"weights")


def test_a_graph_is_exported_once_and_linked_by_the_other_exporting_trials(
    tmp_path: Path,
) -> None:
    """A torch trial that keeps the graph exports it; the onnxruntime trial links it."""
    trials = {t.id: t for t in _grid(bits="[w4]", artifacts=["onnx"])}
    first, second = trials["mlp-rtn-w4-torch"], trials["mlp-rtn-w4-onnxruntime"]
    with shared_folder(tmp_path / "shared", list(trials.values())):
        export = _Exports(tmp_path / "a" / "model.onnx")
        by = SharedFp32.of(first, _model(0)).exported(first, export.graph, export)
        assert by == first.id and export.calls == 1
        target = tmp_path / "b" / "model.onnx"
        target.parent.mkdir()
        other = SharedFp32.of(second, _model(0))
        assert other.exported(second, target, lambda: pytest.fail("exported again")) == first.id
        assert other.read == ["exported_graph"]
        for name in ("model.onnx", "model.onnx.data"):
            assert (target.parent / name).read_bytes() == (export.graph.parent / name).read_bytes()
            assert (target.parent / name).stat().st_ino == (
                export.graph.parent / name
            ).stat().st_ino


def test_a_graph_no_other_trial_exports_is_not_kept(tmp_path: Path) -> None:
    """Without artifacts: [onnx] the torch trial exports nothing: onnxruntime's is alone."""
    trials = _grid(bits="[w4]")
    (graph_trial,) = [t for t in trials if t.runtime == "onnxruntime"]
    with shared_folder(tmp_path / "shared", trials):
        export = _Exports(tmp_path / "a" / "model.onnx")
        SharedFp32.of(graph_trial, _model(0)).exported(graph_trial, export.graph, export)
        assert export.calls == 1
        assert not list((tmp_path / "shared").glob("*/exported-*"))


def test_a_model_is_built_once_and_loaded_with_the_random_state_after_its_build(
    tmp_path: Path,
) -> None:
    trials = _grid(bits="[w4]")
    builds: list[int] = []

    def build() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
        builds.append(1)
        torch.manual_seed(0)
        return _model(7), (torch.randn(2, 8),)

    with shared_folder(tmp_path / "shared", trials):
        model, example, loaded = built_model(trials[0], build)
        after_build = torch.rand(3)
        torch.manual_seed(123)  # another trial's process: its own state until it loads
        again, example_again, loaded_again = built_model(trials[1], build)
        assert torch.equal(torch.rand(3), after_build)
    assert builds == [1] and (loaded, loaded_again) == (False, True)
    assert fingerprint(again) == fingerprint(model)
    assert torch.equal(example_again[0], example[0])


def test_a_build_no_other_trial_loads_is_not_saved_and_one_that_does_not_pickle_is_rebuilt(
    tmp_path: Path,
) -> None:
    (alone,) = _grid(runtimes="[torch]", bits="[w4]")
    with shared_folder(tmp_path / "shared", [alone]):
        built_model(alone, lambda: (_model(0), (torch.zeros(1, 8),)))
        assert not list((tmp_path / "shared").glob("built-*"))
    trials = _grid(bits="[w4]")
    builds: list[int] = []

    def unpicklable() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
        builds.append(1)
        return _Unpicklable(), (torch.zeros(1, 8),)

    with shared_folder(tmp_path / "shared", trials):
        for trial in trials:
            assert built_model(trial, unpicklable)[2] is False
    assert len(builds) == 2
