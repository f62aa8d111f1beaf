"""SmoothQuant: where the smoothing folds, that it preserves the function, that it helps."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from qatbench.measure.error import output_error
from qatbench.methods.dynamic import DynamicMethod
from qatbench.methods.lifecycle import quantize_copy
from qatbench.methods.ptq import ObservedLinear, PtqMethod
from qatbench.methods.smoothquant import (
    ALPHA_GRID,
    ScaledInput,
    SmoothQuantMethod,
    _groups,
    _Trace,
    _TraceFirstCall,
)
from qatbench.models.mlp import Mlp, MlpConfig
from qatbench.models.transformer import TinyTransformer, TransformerConfig
from qatbench.quant.bitwidth import BitWidth
from qatbench.quant.dynamic_linear import DynamicQuantizedLinear
from qatbench.quant.quantized_linear import QuantizedLinear
from qatbench.runtimes import onnxruntime as ortrt
from qatbench.runtimes.onnx_export import export_onnx

W8A8 = BitWidth.parse("w8a8")


def _folds(model: torch.nn.Module, x: torch.Tensor) -> dict[tuple[str, ...], object]:
    trace = _Trace()
    with torch.no_grad():
        _TraceFirstCall(model, trace)(x)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {tuple(g.linears): g.fold_into for g in _groups(model, trace, targets)}


class _SharedNorm(torch.nn.Module):
    """One LayerNorm read by two Linears (shared factor), one read by a Linear and a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_a, self.ln_b = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
        self.q, self.k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.v = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_a(x)
        y = self.q(h) * self.k(h)
        g = self.ln_b(y)
        return g + self.v(g)


def _seeded(factory: type[torch.nn.Module], *args: object) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return factory(*args).eval()


def test_folds_into_layernorms_and_through_relu() -> None:
    transformer = _seeded(TinyTransformer, TransformerConfig(width=32, layers=1))
    assert _folds(transformer, torch.randn(2, 28, 28)) == {
        ("embed",): None,
        ("blocks.0.attn.qkv",): ("layernorm", "blocks.0.ln_1"),
        ("blocks.0.attn.proj",): None,
        ("blocks.0.fc",): ("layernorm", "blocks.0.ln_2"),
        ("blocks.0.out",): None,  # after GELU, which 1/s does not commute with
        ("head",): None,  # after a mean over tokens of the final norm
    }
    mlp = _seeded(Mlp, MlpConfig(hidden=(32, 16)))
    assert _folds(mlp, torch.randn(2, 28, 28)) == {
        ("net.1",): None,
        ("net.3",): ("linear", "net.1"),
        ("net.5",): ("linear", "net.3"),
    }


def test_calibrate_folds_where_the_trace_says() -> None:
    """The statistics hooks must not look like extra readers of a layer's input."""
    x = torch.randn(8, 28, 28)
    mlp = _seeded(Mlp, MlpConfig(hidden=(32, 16)))
    method = SmoothQuantMethod(SmoothQuantMethod.Config(), W8A8)
    smoothed = method.calibrate(method.prepare(copy.deepcopy(mlp)), lambda m: m(x))
    kinds = {n: type(smoothed.get_submodule(n)) for n in ("net.1", "net.3", "net.5")}
    assert kinds == {"net.1": ScaledInput, "net.3": ObservedLinear, "net.5": ObservedLinear}
    transformer = _seeded(TinyTransformer, TransformerConfig(width=32, layers=1))
    smoothed = method.calibrate(method.prepare(copy.deepcopy(transformer)), lambda m: m(x))
    wrapped = {n for n, m in smoothed.named_modules() if isinstance(m, ScaledInput)}
    assert wrapped == {"embed", "blocks.0.attn.proj", "blocks.0.out", "head"}
    ln = smoothed.get_submodule("blocks.0.ln_1")
    assert not torch.equal(ln.weight, transformer.get_submodule("blocks.0.ln_1").weight)


def test_shared_norm_groups_and_residual_readers_block_folding() -> None:
    folds = _folds(_seeded(_SharedNorm), torch.randn(4, 16))
    assert folds == {("q", "k"): ("layernorm", "ln_a"), ("v",): None}


@pytest.mark.parametrize(
    "model",
    [
        _seeded(TinyTransformer, TransformerConfig(width=32, layers=1)),
        _seeded(Mlp, MlpConfig(hidden=(32, 16))),
        _seeded(_SharedNorm),
    ],
    ids=["transformer", "mlp", "shared_norm"],
)
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_preserves_the_fp32_function(model: torch.nn.Module, alpha: float) -> None:
    shape = (8, 16) if isinstance(model, _SharedNorm) else (8, 28, 28)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 2
    method = SmoothQuantMethod(SmoothQuantMethod.Config(alpha=alpha), W8A8)
    smoothed = method.calibrate(method.prepare(copy.deepcopy(model)), lambda m: m(x))
    observed = [m for m in smoothed.modules() if isinstance(m, ObservedLinear)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(observed) == len(linears)
    with torch.inference_mode():
        ref, out = model(x), smoothed(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    changed = [
        a
        for a, b in zip(observed, linears, strict=True)
        if not torch.equal(a.linear.weight, b.weight)
    ]
    assert changed, "smoothing must move scale into the weights"


class _Outliers(torch.nn.Module):
    """A LayerNorm whose gain makes three channels 40x larger, then a Linear: the case
    SmoothQuant exists for (per-tensor activation ranges ruined by a few channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(16, 64)
        self.ln = torch.nn.LayerNorm(64)
        with torch.no_grad():
            self.ln.weight[:3] = 40.0
        self.fc = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.ln(self.embed(x)))))


@dataclass
class _OutlierCase:
    """The outlier model, its calibration loop, an evaluation batch and fp32's outputs."""

    model: torch.nn.Module
    loop: Callable[[torch.nn.Module], None]
    evaluation: torch.Tensor
    ref: torch.Tensor


@pytest.fixture
def outliers() -> _OutlierCase:
    model = _seeded(_Outliers)
    gen = torch.Generator().manual_seed(4)
    calib, evaluation = torch.randn(256, 16, generator=gen), torch.randn(128, 16, generator=gen)

    def loop(m: torch.nn.Module) -> None:
        for xb in calib.split(64):
            m(xb)

    with torch.inference_mode():
        ref = model(evaluation)
    return _OutlierCase(model, loop, evaluation, ref)


def test_smoothing_beats_plain_ptq_on_activation_outliers(
    tmp_path: Path, outliers: _OutlierCase
) -> None:
    model, loop, evaluation, ref = outliers.model, outliers.loop, outliers.evaluation, outliers.ref
    errors = {}
    for name, method in {
        "ptq": PtqMethod(PtqMethod.Config(), W8A8),
        "smoothquant": SmoothQuantMethod(SmoothQuantMethod.Config(alpha=0.5), W8A8),
    }.items():
        q = method.convert(method.calibrate(method.prepare(copy.deepcopy(model)), loop)).eval()
        with torch.inference_mode():
            errors[name] = output_error(ref, q(evaluation))["mse"]
        if name == "smoothquant":
            assert sum(isinstance(m, QuantizedLinear) for m in q.modules()) == 3
            assert isinstance(q.get_submodule("embed"), ScaledInput)  # its input is the data
            path = export_onnx(q, (evaluation[:1],), tmp_path / "sq.onnx")
            assert ortrt.kernel_counts(path, 1) == (3, 0)
            run = ortrt.as_callable(ortrt.make_session(path, 1))
            with torch.inference_mode():
                torch_out = q(evaluation)
            assert float((run(evaluation) - torch_out).abs().max()) < 0.05 * float(
                torch_out.abs().max()
            )
    assert errors["smoothquant"] < 0.5 * errors["ptq"], errors


def test_unfoldable_skip_adds_no_multiply() -> None:
    model = _seeded(Mlp, MlpConfig(hidden=(32, 16)))
    x = torch.randn(8, 28, 28)
    method = SmoothQuantMethod(SmoothQuantMethod.Config(unfoldable="skip"), W8A8)
    q = method.convert(method.calibrate(method.prepare(copy.deepcopy(model)), lambda m: m(x)))
    assert not any(isinstance(m, ScaledInput) for m in q.modules())
    assert sum(isinstance(m, QuantizedLinear) for m in q.modules()) == 3


def test_options_validated() -> None:
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantMethod.Config.model_validate({"alpha": 1.5})
    with pytest.raises(ValueError, match="unfoldable"):
        SmoothQuantMethod.Config.model_validate({"unfoldable": "fold"})
    assert SmoothQuantMethod.changes_layer_inputs is True


def test_dynamic_activations_run_on_the_smoothed_weights_and_beat_plain_dynamic(
    tmp_path: Path, outliers: _OutlierCase
) -> None:
    model, loop, evaluation, ref = outliers.model, outliers.loop, outliers.evaluation, outliers.ref
    plain = DynamicMethod(DynamicMethod.Config(), W8A8)
    smooth = SmoothQuantMethod(SmoothQuantMethod.Config(activations="dynamic"), W8A8)
    errors = {}
    for name, method in {"dynamic": plain, "smoothquant": smooth}.items():
        q = quantize_copy(method, model, lambda: loop, lambda: None)
        with torch.inference_mode():
            errors[name] = output_error(ref, q(evaluation))["mse"]
    assert sum(isinstance(m, DynamicQuantizedLinear) for m in q.modules()) == 3
    assert not any(isinstance(m, ObservedLinear | QuantizedLinear) for m in q.modules())
    path = export_onnx(q, (evaluation[:1],), tmp_path / "sq.onnx")
    assert ortrt.kernel_counts(path, 1) == (3, 0)
    assert errors["smoothquant"] < 0.5 * errors["dynamic"], errors


def test_alpha_auto_keeps_the_alpha_closest_to_fp32_and_says_which() -> None:
    model = _seeded(_Outliers)
    calib = torch.randn(128, 16, generator=torch.Generator().manual_seed(5))

    def loop(m: torch.nn.Module) -> None:
        for xb in calib.split(64):
            m(xb)

    method = SmoothQuantMethod(SmoothQuantMethod.Config(alpha="auto"), W8A8)
    q = quantize_copy(method, model, lambda: loop, lambda: None)
    chosen = method.choices()
    errors = {float(a): e for a, e in chosen["smoothquant_alpha_mse"].items()}
    assert set(errors) == set(ALPHA_GRID)
    assert chosen["smoothquant_alpha"] == min(errors, key=errors.__getitem__)
    assert len(set(errors.values())) > 1  # the grid points differ: the choice means something
    with torch.inference_mode():
        mse = float(F.mse_loss(q(calib), model(calib)))
    assert mse == pytest.approx(errors[chosen["smoothquant_alpha"]], rel=1e-4)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantMethod.Config(alpha="best")  # type: ignore[arg-type]
