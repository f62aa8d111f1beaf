"""Bring your own model: several inputs of any dtype given by name, structured outputs,
synthetic data that follows each input's dtype, and one line for what does not fit."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from qatbench.data.datasets import load_data
from qatbench.data.inputs import Inputs
from qatbench.errors import ConfigError
from qatbench.models.adapters import select_output
from qatbench.spec.schema import DataSpec, TrialSpec, validate_experiment
from qatbench.trial.lifecycle import run_trial

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _bert_folder(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QATBENCH_TEST_BERT", str(tmp_path_factory.getbasetemp() / "tiny-bert"))


def _trial(method: str, runtime: str, model: dict[str, object] | None = None) -> TrialSpec:
    spec = validate_experiment(
        {
            "name": "byo",
            "models": [model or {"name": "bert", "factory": "data.byo_models:tiny_bert"}],
            "methods": [method],
            "runtimes": [runtime],
            "data": {
                "dataset": "synthetic",
                "calibration_samples": 16,
                "eval_samples": 16,
                "batch_size": 8,
                "vocab_size": 500,
            },
            "measure": {
                "batch_sizes": [1, 4],
                "max_time_s": 0.05,
                "min_rounds": 3,
                "warmup_s": 0,
                "repeats": 2,
                "per_layer": True,
            },
        },
        source="byo.yaml",
    )
    (trial,) = spec.expand()
    return trial


@pytest.mark.parametrize(("method", "runtime"), [("dynamic", "onnxruntime"), ("ptq", "torch")])
def test_a_two_input_integer_encoder_runs_every_phase(
    method: str, runtime: str, tmp_path: Path
) -> None:
    threads = torch.get_num_threads()
    try:
        result = run_trial(_trial(method, runtime), tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert result.status == "finished", result.error
    m = result.metrics
    assert m["speedup_vs_fp32_b4"] > 0 and 0.9 < m["cosine"] <= 1.0
    assert m["int_op_fraction"] > 0.5  # the encoder's Linear layers run integer kernels
    graph = onnx.load(result.artifacts["onnx"])
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.graph.input)


def test_synthetic_data_follows_each_inputs_dtype() -> None:
    ids, mask = torch.randint(0, 50, (1, 6)), torch.ones(1, 6, dtype=torch.long)
    spec = DataSpec(dataset="synthetic", calibration_samples=4, eval_samples=3, vocab_size=50)
    data = load_data(spec, Inputs((ids, mask)), seed=0)
    assert isinstance(data.eval_x, Inputs) and len(data.eval_x) == 3
    got_ids, got_mask = data.eval_x.args
    assert got_ids.dtype == torch.int64 and int(got_ids.min()) >= 0 and int(got_ids.max()) < 50
    assert len(set(got_ids.flatten().tolist())) > 1  # token ids, not a constant
    assert torch.equal(got_mask, torch.ones(3, 6, dtype=torch.long))  # masks stay masks


def test_the_output_compared_follows_the_rule_and_the_override() -> None:
    out = {"features": torch.zeros(1, 3), "scores": torch.ones(1, 2)}
    assert select_output(out, "scores", "m").shape == (1, 2)
    assert select_output(out, None, "m").shape == (1, 3)  # no preferred name: the first
    logits = {"hidden": torch.zeros(1), "logits": torch.ones(2)}
    assert select_output(logits, None, "m").shape == (2,)
    assert select_output((torch.zeros(1), torch.ones(2)), 1, "m").shape == (2,)
    with pytest.raises(ConfigError, match=r"m: output 'nope' names no output; outputs: \["):
        select_output(out, "nope", "m")


def test_a_structured_output_model_runs_with_its_chosen_output(tmp_path: Path) -> None:
    model = {"name": "heads", "factory": "data.byo_models:two_heads", "output": "scores"}
    result = run_trial(_trial("dynamic", "onnxruntime", model), tmp_path)
    assert result.status == "finished", result.error
    graph = onnx.load(result.artifacts["onnx"])
    assert graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4  # scores


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        (
            {"name": "bad", "factory": "data.byo_models:bad_example"},
            "models: bad: example inputs must be a tensor, a tuple of tensors or a dict",
        ),
        (
            {"name": "heads", "factory": "data.byo_models:two_heads", "output": "nope"},
            "models: heads: output 'nope' names no output; outputs: ['features', 'scores']",
        ),
    ],
)
def test_what_does_not_fit_fails_in_build_with_one_line(
    model: dict[str, object], fragment: str, tmp_path: Path
) -> None:
    result = run_trial(_trial("fp32", "torch", model), tmp_path)
    assert result.status == "failed" and result.error is not None
    assert result.error.phase == "build"
    assert fragment in result.error.reason and "\n" not in result.error.reason
