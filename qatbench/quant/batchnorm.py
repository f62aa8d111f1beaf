"""Fold eval-mode BatchNorm into the convolution that feeds it, before quantization.

A conv followed by BatchNorm computes ``gamma * (conv(x) - mean) / sqrt(var + eps) + beta``:
one conv with rescaled weights and a new bias (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`).
Folding first means calibration observes, and the integers hold, what the deployed conv
computes, as onnxruntime's quantizer, NNCF and PT2E do.

Pairs are found on the module graph that :func:`torch.fx.symbolic_trace` records (a conv
whose only user is a BatchNorm); a model that does not trace falls back to adjacent
``conv, bn`` children of ``nn.Sequential`` containers. The model keeps its structure: the
conv is replaced by the folded one, the BatchNorm by ``nn.Identity``.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_PAIRS = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return any(isinstance(conv, c) and type(bn) is b for c, b in _PAIRS) and bool(
        getattr(bn, "track_running_stats", False)
    )


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` of every BatchNorm fed only by a conv."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # dynamic control flow: fall back to Sequential neighbours
        return _sequential_pairs(model)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        if len(source.users) != 1:
            continue
        conv, bn = model.get_submodule(str(source.target)), model.get_submodule(str(node.target))
        if _foldable(conv, bn):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a, conv), (b, bn) in itertools.pairwise(children):
            if _foldable(conv, bn):
                stem = f"{prefix}." if prefix else ""
                pairs.append((stem + a, stem + b))
    return pairs


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every conv->BatchNorm pair of ``model`` in place; returns how many."""
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(conv, nn.modules.conv._ConvNd)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        model.set_submodule(conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        model.set_submodule(bn_name, nn.Identity())
    return len(pairs)
