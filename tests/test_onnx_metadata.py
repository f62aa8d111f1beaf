"""Every method's exported graph: qatbench's metadata_props, a dynamic batch axis on every
input and output, and integer kernels in onnxruntime for every integer method."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from qatbench import registry
from qatbench.errors import PluginError
from qatbench.methods.base import QuantMethod
from qatbench.models.mlp import build_mlp
from qatbench.quant.bitwidth import BitWidth
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.runtimes.onnx_export import check_batch_axis, check_onnx, export_onnx, write_metadata
from qatbench.spec.schema import TrialSpec, validate_experiment
from qatbench.trial.lifecycle import onnx_metadata

ONNX_METHODS = sorted(
    name
    for name in registry.methods.names()
    if "onnx_graph" in registry.methods.get(name).capabilities.artifacts
)
KEYS = {
    "qatbench.version",
    "qatbench.method",
    "qatbench.bits",
    "qatbench.calibration",
    "qatbench.group_size",
    "qatbench.method_options",
    "qatbench.opset",
}


def _bits(method: type[QuantMethod]) -> str:
    allowed = method.capabilities.allowed_bits()
    return next((b for b in ("w8a8", "w8", "w4", "w16a16") if b in allowed), allowed[0])


def _trial(name: str, bits: str, options: dict[str, object]) -> TrialSpec:
    spec = validate_experiment(
        {
            "name": "meta",
            "models": [{"name": "mlp", "options": {"in_features": 64, "hidden": [64]}}],
            "methods": [{"name": name, "bits": [bits], "options": options}],
            "runtimes": ["onnxruntime"],
            "data": {"dataset": "synthetic", "calibration_samples": 48, "batch_size": 16},
        },
        source="t",
    )
    (trial,) = spec.expand()
    return trial


def _exported(name: str, tmp_path: Path, options: dict[str, object]) -> tuple[TrialSpec, Path]:
    cls = registry.methods.get(name)
    trial = _trial(name, _bits(cls) if cls.capabilities.quantizes else "fp32", options)
    method = cls(cls.Config.model_validate(options), BitWidth.parse(trial.bits))
    torch.manual_seed(0)
    model, example = build_mlp(in_features=64, hidden=[64])
    calib = torch.randn(48, 8, 8)
    model = method.prepare(model.eval())
    if cls.capabilities.needs_calibration:
        model = method.calibrate(model, lambda m: [m(x) for x in calib.split(16)])
    if cls.capabilities.needs_training:
        model = method.train(model, lambda _m, _opt, _steps: None)
    model = method.convert(model).eval()
    path = tmp_path / "model.onnx"
    method.export(model, example, path)
    write_metadata(path, onnx_metadata(trial, method))
    return trial, path


@pytest.mark.parametrize("name", ONNX_METHODS)
def test_every_export_is_labelled_with_a_batch_axis(name: str, tmp_path: Path) -> None:
    cls = registry.methods.get(name)
    if getattr(cls, "unavailable_reason", lambda: None)():
        pytest.skip(cls.unavailable_reason())
    trial, path = _exported(name, tmp_path, {})
    model = check_onnx(path)  # the checker and the batch-axis check
    props = {p.key: p.value for p in model.metadata_props}
    assert set(props) >= KEYS
    assert props["qatbench.method"] == name
    assert props["qatbench.bits"] == trial.bits
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert props["qatbench.opset"] == str(opset) and opset >= 17
    if cls.capabilities.needs_calibration:
        calibration = json.loads(props["qatbench.calibration"])
        assert calibration["batches"] == 3 and calibration["samples"] == 48
    else:
        assert props["qatbench.calibration"] == "none"
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param, value.name
    # Integer methods run integer kernels after onnxruntime's optimisations; fp32, the
    # casts and simulated quantization do not.
    integer, floating = ortrt.kernel_counts(path, 1)
    fraction = integer / max(integer + floating, 1)
    if name == "nncf_ptq":
        # onnxruntime does not fuse NNCF's QDQ pattern on this graph (docs/cpu-results.md):
        # its integer layers are the ones OpenVINO, NNCF's own runtime, runs.
        fraction = registry.runtimes.get("openvino")(1).integer_fraction(path) or 0.0
    caps = cls.capabilities
    if caps.quantizes and not cls.simulated and max(caps.weight_bits) <= 8:
        assert fraction > 0, f"{name} {trial.bits} runs no integer kernel"
    else:
        assert fraction == 0


def test_metadata_names_observer_and_group_size(tmp_path: Path) -> None:
    options = {"observer": "percentile"}
    _, path = _exported("ptq", tmp_path / "ptq", options)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["qatbench.calibration"])["observer"] == "percentile"
    assert props["qatbench.group_size"] == "n/a"
    assert json.loads(props["qatbench.method_options"]) == options
    _, path = _exported("rtn", tmp_path / "rtn", {"group_size": 32})
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["qatbench.group_size"] == "32"
    _, path = _exported("rtn", tmp_path / "rtn_channel", {})
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["qatbench.group_size"] == "per_channel"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's notices
def test_a_fixed_batch_dimension_is_rejected(tmp_path: Path) -> None:
    model, example = build_mlp(in_features=64, hidden=[8])
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model.eval(), example, str(path), dynamo=False, input_names=["input"])
    with pytest.raises(PluginError, match="input 'input' has a fixed batch dimension"):
        check_batch_axis(onnx.load(str(path)))
    dynamic = export_onnx(model, example, tmp_path / "dynamic.onnx")
    check_batch_axis(onnx.load(str(dynamic)))


def test_write_metadata_keeps_other_props(tmp_path: Path) -> None:
    model, example = build_mlp(in_features=64, hidden=[8])
    path = export_onnx(model.eval(), example, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"author": "someone"})
    onnx.save(proto, str(path))
    write_metadata(path, {"qatbench.method": "fp32"})
    write_metadata(path, {"qatbench.method": "rtn"})  # replaces, never duplicates
    props = [(p.key, p.value) for p in onnx.load(str(path)).metadata_props]
    assert dict(props) == {"author": "someone", "qatbench.method": "rtn", "qatbench.opset": "17"}
    assert len(props) == 3
