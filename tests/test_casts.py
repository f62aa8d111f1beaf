"""The ``bf16`` and ``fp16`` casts: half the bytes, fp32 interface, honest runtimes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from qatbench import registry
from qatbench.errors import ConfigError
from qatbench.measure.size import save_torch_artifact, torch_weight_bytes
from qatbench.methods.casts import Bf16Method, CastModel, Fp16Method
from qatbench.models.mlp import Mlp, MlpConfig
from qatbench.models.transformer import TinyTransformer, TransformerConfig
from qatbench.quant.bitwidth import BitWidth
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.runtimes.onnx_export import export_onnx
from qatbench.spec.schema import validate_experiment

HALF = BitWidth.parse("w16a16")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return {
            "mlp": Mlp(MlpConfig(hidden=(64, 32))).eval(),
            "transformer": TinyTransformer(TransformerConfig(width=32, layers=1)).eval(),
        }


@pytest.mark.parametrize("method_cls", [Bf16Method, Fp16Method])
@pytest.mark.parametrize("model_name", ["mlp", "transformer"])
def test_cast_halves_the_bytes_and_keeps_the_fp32_interface(
    method_cls: type[Bf16Method],
    model_name: str,
    models: dict[str, torch.nn.Module],
    tmp_path: Path,
) -> None:
    fp32 = models[model_name]
    converted = method_cls(bits=HALF).convert(copy.deepcopy(fp32))
    assert isinstance(converted, CastModel)
    assert {p.dtype for p in converted.parameters()} == {method_cls.dtype}
    x = torch.randn(4, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref, out = fp32(x), converted(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    cosine = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0)
    assert float(cosine) > 0.999
    assert torch_weight_bytes(converted) * 2 == torch_weight_bytes(fp32)
    half = save_torch_artifact(converted, tmp_path / "half" / "model.pt")
    full = save_torch_artifact(fp32, tmp_path / "full" / "model.pt")
    assert 0.45 < half / full < 0.56  # the same tensors in 2 bytes, plus the archive's framing


def test_runtimes_are_declared_as_measured() -> None:
    assert Bf16Method.capabilities.artifacts == {"torch_module", "compilable"}
    assert Fp16Method.capabilities.artifacts == {"torch_module", "compilable", "onnx_graph"}
    assert Bf16Method.capabilities.allowed_bits() == ["w16a16"]
    assert {"bf16", "fp16"} <= set(registry.methods.names())


def test_fp16_graph_runs_on_onnxruntime_and_agrees(
    models: dict[str, torch.nn.Module], tmp_path: Path
) -> None:
    converted = Fp16Method(bits=HALF).convert(copy.deepcopy(models["transformer"]))
    x = torch.randn(3, 28, 28)
    path = export_onnx(converted, (x[:1],), tmp_path / "fp16.onnx")
    run = ortrt.as_callable(ortrt.make_session(path, 1))
    out = run(x)
    assert out.dtype == torch.float32
    with torch.inference_mode():
        assert float((out - converted(x)).abs().max()) < 2e-2


def test_bf16_cannot_be_asked_for_onnxruntime() -> None:
    spec = {
        "name": "casts",
        "models": ["mlp"],
        "methods": ["bf16"],
        "bits": ["w16a16"],
        "runtimes": ["onnxruntime"],
    }
    with pytest.raises(ConfigError, match=r"bf16.*runs on none of"):
        validate_experiment(spec)
    with pytest.raises(ConfigError, match="allowed: w16a16"):
        validate_experiment({**spec, "bits": ["w8a8"], "runtimes": ["torch"]})
