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
            "artifacts": ["onnx"],  # every phase, the graph of a torch trial too
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


@pytest.mark.parametrize(
    ("method", "runtime"),
    [("dynamic", "onnxruntime"), ("ptq", "torch"), ("ort_static", "onnxruntime")],
)
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


def _with_task(task: object) -> TrialSpec:
    spec = validate_experiment(
        {
            "name": "byo_task",
            "models": [{"name": "bert", "factory": "data.byo_models:tiny_bert"}],
            "methods": [{"name": "dynamic"}],
            "task": task,
            "data": {
                "dataset": "synthetic",
                "calibration_samples": 16,
                "eval_samples": 16,
                "batch_size": 8,
                "vocab_size": 500,
            },
            "measure": {
                "batch_sizes": [1],
                "max_time_s": 0.05,
                "min_rounds": 3,
                "warmup_s": 0,
                "repeats": 2,
                "per_layer": False,
            },
        },
        source="task.yaml",
    )
    (trial,) = spec.expand()
    return trial


def test_the_embedding_task_and_a_users_metric_judge_the_outputs(tmp_path: Path) -> None:
    result = run_trial(_with_task("embedding"), tmp_path / "a")
    assert result.status == "finished", result.error
    assert 0.9 < result.metrics["embedding_cosine"] <= 1.0
    assert 0 <= result.metrics["retrieval_agreement"] <= 100
    assert result.details["metric_directions"]["embedding_cosine"] == "higher"
    mine = run_trial(_with_task({"factory": "data.byo_models:MeanAbsShift"}), tmp_path / "b")
    assert mine.status == "finished", mine.error
    assert mine.metrics["mean_abs_shift"] > 0


def test_a_metric_that_is_not_a_number_fails_the_trial_with_one_line(tmp_path: Path) -> None:
    result = run_trial(_with_task({"factory": "data.byo_models:Chatty"}), tmp_path)
    assert result.status == "failed" and result.error is not None
    assert result.error.reason == "task 'chatty': metric 'verdict' is str, not a number"


@pytest.mark.parametrize(
    ("task", "fragment"),
    [
        ("accuracyy", "task.name: unknown task 'accuracyy'; known tasks: classification"),
        (
            {"factory": "data.byo_models:two_heads"},
            "task.factory: 'data.byo_models:two_heads' is not a qatbench Task",
        ),
    ],
)
def test_an_unknown_task_is_rejected_at_validate(task: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        _with_task(task)
    assert fragment in str(info.value)


EXAMPLE = Path(__file__).resolve().parents[1] / "experiments" / "byo_model.yaml"


def test_the_shipped_example_runs_its_own_data_and_metric(tmp_path: Path) -> None:
    """experiments/byo_model.yaml's model, data factory and the example's own metric
    (examples/byo_encoder, on this suite's pythonpath), one trial in-process."""
    import yaml

    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["methods"], doc["runtimes"] = ["dynamic"], ["onnxruntime"]
    doc["task"] = {"factory": "qatbench_byo_example.metric:NormRatio"}
    doc["measure"] = {"batch_sizes": [1], "max_time_s": 0.05, "min_rounds": 3, "repeats": 2}
    (trial,) = validate_experiment(doc, source=str(EXAMPLE)).expand()
    result = run_trial(trial, tmp_path)
    assert result.status == "finished", result.error
    assert 0.9 < result.metrics["embedding_cosine_worst"] <= 1.0
    assert 0.9 < result.metrics["norm_ratio_worst"] <= 1.0
    assert result.details["metric_directions"] == {
        "norm_ratio_worst": "higher",
        "embedding_cosine_worst": "higher",
    }


def test_a_data_factory_whose_batches_do_not_fit_is_one_line(tmp_path: Path) -> None:
    import yaml

    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["methods"], doc["runtimes"] = ["fp32"], ["torch"]
    doc["models"][0]["factory"] = "data.byo_models:two_heads"  # one float input, 8 wide
    doc["models"][0]["options"] = {}
    doc["data"] = {"factory": "data.byo_models:wrong_width"}
    (trial,) = validate_experiment(doc, source=str(EXAMPLE)).expand()
    result = run_trial(trial, tmp_path)
    assert result.status == "failed" and result.error is not None
    assert result.error.phase == "data"
    assert result.error.reason == (
        "data.factory 'data.byo_models:wrong_width': calib_x is float32 [8, 5]; "
        "the model's example is float32 [1, 8]"
    )


@pytest.fixture(scope="module")
def bert_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT and its WordPiece tokenizer, saved with save_pretrained (no download)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from qatbench.data.sentences import corpus_sentences

    folder = tmp_path_factory.mktemp("bert-tok")
    words = sorted({w.lower() for s in corpus_sentences()[:400] for w in s.split() if w.isalpha()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words[:600]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def test_hf_encoder_on_its_own_tokenizers_sentences(
    bert_with_tokenizer: Path, tmp_path: Path
) -> None:
    spec = validate_experiment(
        {
            "name": "hf_enc",
            "models": [
                {"name": "hf_encoder", "options": {"hf": str(bert_with_tokenizer), "seq_len": 24}}
            ],
            "methods": ["dynamic"],
            "runtimes": ["onnxruntime"],
            "data": {
                "dataset": "sentences",
                "tokenizer": str(bert_with_tokenizer),
                "calibration_samples": 16,
                "eval_samples": 16,
                "batch_size": 8,
            },
            "measure": {
                "batch_sizes": [1],
                "max_time_s": 0.05,
                "min_rounds": 3,
                "repeats": 2,
                "per_layer": False,
            },
        },
        source="hf_enc.yaml",
    )
    (trial,) = spec.expand()
    result = run_trial(trial, tmp_path)
    assert result.status == "finished", result.error
    assert 0.9 < result.metrics["embedding_cosine"] <= 1.0  # the dataset's task: embedding
    assert "retrieval_agreement" in result.metrics


def test_sentences_need_an_encoders_two_integer_inputs() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\] \(mlp\): data.dataset 'sentences' gives"):
        validate_experiment(
            {"name": "s", "models": ["mlp"], "methods": ["fp32"], "data": {"dataset": "sentences"}},
            source="s.yaml",
        )
