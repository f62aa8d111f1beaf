"""onnxruntime's quantizers as methods: integer graphs, no litter, honest runtimes."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import onnx
import pytest
import torch

from qatbench.errors import PluginError
from qatbench.methods.base import QuantMethod
from qatbench.methods.ort_quantizers import (
    OrtDynamicMethod,
    OrtInt4Method,
    OrtStaticMethod,
    gemm_to_matmul,
)
from qatbench.models.mlp import Mlp, MlpConfig
from qatbench.models.transformer import TinyTransformer, TransformerConfig
from qatbench.quant.bitwidth import BitWidth
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.runtimes.onnx_export import check_onnx, export_onnx

CASES = [
    (OrtDynamicMethod, "w8a8", {"DynamicQuantizeMatMul"}),
    (OrtStaticMethod, "w8a8", {"QLinearMatMul", "QGemm"}),
    (OrtInt4Method, "w4", {"MatMulNBits"}),
]


def _seeded(factory: type[torch.nn.Module], config: object) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return factory(config).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {
        "mlp": _seeded(Mlp, MlpConfig(hidden=(64, 32))),
        "transformer": _seeded(TinyTransformer, TransformerConfig(width=32, layers=1)),
    }


def _optimized_ops(path: Path, tmp_path: Path) -> set[str]:
    import onnxruntime as ort

    options = ortrt.session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}


def test_gemm_rewrite_keeps_the_function(
    models: dict[str, torch.nn.Module], tmp_path: Path
) -> None:
    x = torch.randn(5, 28, 28)
    path = export_onnx(models["mlp"], (x[:1],), tmp_path / "fp32.onnx")
    proto = onnx.load(str(path))
    assert gemm_to_matmul(proto) == 3
    assert not [n for n in proto.graph.node if n.op_type == "Gemm"]
    rewritten = tmp_path / "rewritten.onnx"
    onnx.save(proto, str(rewritten))
    check_onnx(rewritten)
    before = ortrt.as_callable(ortrt.make_session(path, 1))(x)
    after = ortrt.as_callable(ortrt.make_session(rewritten, 1))(x)
    assert torch.allclose(before, after, atol=1e-5)
    assert len(proto.graph.initializer) == len(onnx.load(str(path)).graph.initializer)


@pytest.mark.parametrize(("method_cls", "bits", "kernels"), CASES, ids=[c[0].name for c in CASES])
@pytest.mark.parametrize("model_name", ["mlp", "transformer"])
def test_adapter_writes_an_integer_graph_and_leaves_no_files(
    method_cls: type[QuantMethod],
    bits: str,
    kernels: set[str],
    model_name: str,
    models: dict[str, torch.nn.Module],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    fp32 = models[model_name]
    gen = torch.Generator().manual_seed(5)
    calib = torch.randn(64, 28, 28, generator=gen)
    x = torch.randn(16, 28, 28, generator=gen)
    method = method_cls(method_cls.Config(), BitWidth.parse(bits))
    model = method.prepare(copy.deepcopy(fp32))
    if method.capabilities.needs_calibration:
        model = method.calibrate(model, lambda m: [m(xb) for xb in calib.split(16)])
    converted = method.convert(model)
    assert converted is model  # the torch model stays fp32; the work is in export
    out_path = tmp_path / "out" / "model.onnx"
    written = method.export(converted, (x[:1],), out_path)
    assert Path(written) == out_path.absolute()
    assert os.listdir(workdir) == [], "the quantizer left files in the working directory"
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["model.onnx"]
    check_onnx(out_path)
    integer, _floating = ortrt.kernel_counts(out_path, 1)
    assert integer >= (3 if model_name == "mlp" else 5)
    assert kernels & _optimized_ops(out_path, tmp_path)
    run = ortrt.as_callable(ortrt.make_session(out_path, 1))
    with torch.inference_mode():
        ref = fp32(x)
    cosine = torch.nn.functional.cosine_similarity(ref.flatten(), run(x).flatten(), dim=0)
    assert float(cosine) > 0.99


def test_adapters_run_on_onnxruntime_only() -> None:
    for method_cls, _bits, _kernels in CASES:
        assert method_cls.capabilities.artifacts == {"onnx_graph"}
    assert OrtInt4Method.capabilities.allowed_bits() == ["w4"]
    assert OrtStaticMethod.capabilities.needs_calibration
    assert not OrtDynamicMethod.capabilities.needs_calibration


def test_static_without_calibration_fails_clearly(
    models: dict[str, torch.nn.Module], tmp_path: Path
) -> None:
    method = OrtStaticMethod(OrtStaticMethod.Config(), BitWidth.parse("w8a8"))
    with pytest.raises(PluginError, match="calibrate"):
        method.export(models["mlp"], (torch.zeros(1, 28, 28),), tmp_path / "m.onnx")


def test_excluded_nodes_stay_float(models: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    fp32 = models["mlp"]
    path = export_onnx(fp32, (torch.zeros(1, 28, 28),), tmp_path / "fp32.onnx")
    first = next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Gemm")
    method = OrtDynamicMethod(
        OrtDynamicMethod.Config(nodes_to_exclude=[first]), BitWidth.parse("w8a8")
    )
    out = method.export(fp32, (torch.zeros(1, 28, 28),), tmp_path / "q.onnx")
    assert ortrt.kernel_counts(out, 1) == (2, 1)


def test_options_validated() -> None:
    with pytest.raises(ValueError, match="block_size"):
        OrtInt4Method.Config.model_validate({"block_size": 48})
    with pytest.raises(ValueError, match="calibrate_method"):
        OrtStaticMethod.Config.model_validate({"calibrate_method": "kl"})
    with pytest.raises(ValueError, match="extra"):
        OrtDynamicMethod.Config.model_validate({"per_tensor": True})
