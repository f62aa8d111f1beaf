"""An experiment that cannot fit this machine's memory or disk is rejected before anything
is built, with one line giving the estimate and what is available, unless forced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from qatbench.cli import app
from qatbench.errors import ConfigError
from qatbench.spec import resources
from qatbench.spec.schema import validate_experiment

# A Llama-70B-shaped decoder: 280 GB of fp32 weights, built on the meta device only.
HUGE = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}


def _experiment(hf_config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    data = {
        "name": "fit",
        "models": [{"name": "hf_causal_lm", "options": {"hf_config": hf_config, "seq_len": 8}}],
        "methods": ["fp32"],
        "runtimes": ["torch", "onnxruntime"],
        "data": {"dataset": "text", "seq_len": 8, "pretrain_epochs": 0},
    }
    data.update(overrides)
    return data


def test_a_model_that_cannot_fit_in_memory_is_rejected_with_the_estimate(tmp_path: Path) -> None:
    spec = validate_experiment(_experiment(HUGE), source="huge.yaml")
    found = resources.estimate(spec)
    assert found is not None
    assert 68e9 < found.parameters < 70e9
    assert found.worst == "hf_causal_lm-fp32-fp32-onnxruntime"  # the graph runtime's peak
    with pytest.raises(ConfigError) as caught:
        resources.check_fits(spec, "huge.yaml", tmp_path)
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith("huge.yaml: trial hf_causal_lm-fp32-fp32-onnxruntime needs about")
    assert "GiB of memory" in line and "GiB are available" in line and "--force" in line


def test_check_resources_false_skips_the_estimate(tmp_path: Path) -> None:
    spec = validate_experiment(_experiment(HUGE, check_resources=False), source="t")
    assert resources.check_fits(spec, "t", tmp_path) is None


def test_disk_is_estimated_from_the_kept_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = {**HUGE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    small.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    spec = validate_experiment(_experiment(small, artifacts=["torch"]), source="t")
    found = resources.check_fits(spec, "t", tmp_path)
    assert found is not None
    weights = found.fp32_weight_bytes
    # torch: model.pt; onnxruntime: model.pt, the graph twice (folder and MLflow), the
    # fp32 reference graph for a moment; the fp32 build the two trials share
    assert found.disk_bytes == weights * (1 + 1 + resources.ONNX_COPIES + 1 + 1)

    class Full:
        free = found.disk_bytes - 1

    monkeypatch.setattr(resources.shutil, "disk_usage", lambda _where: Full())
    with pytest.raises(ConfigError, match=r"^t: the sweep writes up to .* GiB are free there"):
        resources.check_fits(spec, "t", tmp_path / "not" / "yet")


def test_validate_rejects_then_forced_accepts(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(_experiment(HUGE)))
    runner = CliRunner()
    refused = runner.invoke(app, ["validate", str(path)])
    assert isinstance(refused.exception, ConfigError)  # printed as one line, exit 2, by main
    assert refused.exception.exit_code == 2
    assert "GiB of memory" in str(refused.exception)
    forced = runner.invoke(app, ["validate", "--force", str(path)])
    assert forced.exit_code == 0, forced.output
    assert "ok, 2 trials" in forced.output


def test_a_quantized_graph_and_a_shared_conversion_are_counted_at_their_bits(
    tmp_path: Path,
) -> None:
    small = {**HUGE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    small.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    rtn = [{"name": "rtn", "bits": ["w4"]}]
    spec = validate_experiment(_experiment(small, methods=rtn), source="t")
    size = resources.model_size(spec.models[0])
    assert size is not None
    # per layer q, o 64x64; k, v 64x32; gate, up, down 64x128; and the 256x64 head
    linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 256 * 64
    assert size.bytes_by_layer_type["Linear"] == 4 * linear
    assert size.bytes_by_layer_type["Embedding"] == 4 * 256 * 64
    quantized = size.fp32_bytes - 4 * linear + 4 * linear * (4 + resources.SCALE_BITS) // 32
    assert size.quantized_bytes(frozenset({"Linear"}), 4) == quantized
    found = resources.estimate(spec)
    assert found is not None
    # onnxruntime's graph twice, the fp32 reference graph for a moment, the fp32 build and
    # the converted model that the torch and onnxruntime trials share; torch keeps nothing
    shared = size.fp32_bytes + quantized
    assert found.disk_bytes == resources.ONNX_COPIES * quantized + size.fp32_bytes + shared
