"""torchao's int8 configs as methods, and their clear failure when torchao is missing."""

from __future__ import annotations

import builtins
import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from qatbench import registry
from qatbench.errors import PluginError
from qatbench.methods import torchao_adapters
from qatbench.methods.torchao_adapters import (
    INSTALL_HINT,
    TorchaoInt8DynamicMethod,
    TorchaoInt8WeightOnlyMethod,
)
from qatbench.models.mlp import Mlp, MlpConfig
from qatbench.quant.bitwidth import BitWidth

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
CASES = [(TorchaoInt8DynamicMethod, "w8a8"), (TorchaoInt8WeightOnlyMethod, "w8")]


def _mlp() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Mlp(MlpConfig(hidden=(64,))).eval()


def test_registered_for_torch_only() -> None:
    for method_cls, bits in CASES:
        assert registry.methods.get(method_cls.name) is method_cls
        assert method_cls.capabilities.artifacts == {"torch_module", "compilable"}
        assert method_cls.capabilities.allowed_bits() == [bits]


def test_missing_torchao_is_a_clear_plugin_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_torchao(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "torchao" or name.startswith("torchao."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    for mod in [m for m in list(sys.modules) if m.split(".")[0] == "torchao"]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert torchao_adapters.unavailable_reason() == INSTALL_HINT
    method = TorchaoInt8DynamicMethod(bits=BitWidth.parse("w8a8"))
    with pytest.raises(PluginError, match=r"pip install 'qatbench\[torchao\]'"):
        method.convert(method.prepare(_mlp()))


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (extra 'torchao')")
@pytest.mark.parametrize(("method_cls", "bits"), CASES, ids=[c[0].name for c in CASES])
def test_torchao_int8_runs_and_declines_onnx(
    method_cls: type[TorchaoInt8DynamicMethod], bits: str, tmp_path: Path
) -> None:
    assert torchao_adapters.unavailable_reason() is None
    fp32 = _mlp()
    cfg = method_cls.Config(keep_fp32=["<last>"])
    method = method_cls(cfg, BitWidth.parse(bits))
    q = method.convert(method.prepare(copy.deepcopy(fp32)))
    assert type(q.get_submodule("net.3").weight) is torch.nn.Parameter  # kept in fp32
    assert type(q.get_submodule("net.1").weight.data) is not torch.Tensor  # torchao tensor
    x = torch.randn(8, 28, 28)
    with torch.inference_mode():
        ref, out = fp32(x), q(x)
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    with pytest.raises(PluginError, match="do not export to ONNX"):
        method.export(q, (x[:1],), tmp_path / "m.onnx")
