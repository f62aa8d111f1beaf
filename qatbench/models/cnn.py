"""Convolutional networks: a digits ResNet and two ImageNet-shaped CNNs, defined here.

- ``resnet_tiny``: a small residual CNN for the 28x28 digits (``[N, 1, 28, 28]`` inputs):
  a 3x3 stem, a basic residual block, a strided block with a 1x1 projection shortcut and an
  inverted-residual block around a depthwise 3x3 convolution, every conv followed by
  BatchNorm; global average pooling and a Linear classifier. Trained on ``digits`` like the
  MLP (``data: {dataset: digits, pretrain_epochs: N}``).
- ``resnet18`` and ``mobilenet_v3_small``: the torchvision architectures with the same
  module names, so a ``state_dict`` saved from torchvision loads unchanged through the
  ``weights`` option (a local file; nothing is downloaded). torchvision itself is not
  imported: PyPI's build for torch 2.13 is a CUDA build that fails to import against the
  CPU torch. A user with a working torchvision passes its models through ``factory:``.

Randomly initialised, deep CNNs in eval mode lose their signal (MobileNetV3's outputs are
about 1e-9 with torchvision's initialisation), which makes every output-error metric
meaningless. Without ``weights``, these models therefore set their BatchNorm statistics from
a seeded batch of Gaussian inputs (``bn_calibration_samples``), so each BatchNorm
normalises what it actually receives and the outputs carry signal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qatbench.errors import ConfigError

# ---------------------------------------------------------------------------- resnet_tiny


class _ConvBn(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d (+ activation), torchvision's Conv2dNormActivation."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        activation: Callable[[], nn.Module] | None = nn.ReLU,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, eps=bn_eps, momentum=bn_momentum),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class _TinyBasicBlock(nn.Module):
    """Two 3x3 conv+BN; a 1x1 conv+BN shortcut where shape changes; ReLU after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _ConvBn(c_in, c_out, 3, stride)
        self.conv2 = _ConvBn(c_out, c_out, 3, activation=None)
        self.shortcut = (
            _ConvBn(c_in, c_out, 1, stride, activation=None)
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class _TinyInvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, depthwise 3x3, 1x1 project, identity shortcut."""

    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(
            _ConvBn(channels, hidden, 1),
            _ConvBn(hidden, hidden, 3, groups=hidden),  # depthwise
            _ConvBn(hidden, channels, 1, activation=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


@dataclass(frozen=True)
class ResNetTinyConfig:
    in_channels: int = 1
    width: int = 16
    expand: int = 4
    num_classes: int = 10
    image_size: int = 28


class ResNetTiny(nn.Module):
    """Stem, basic block, strided block, depthwise inverted residual, pool, classifier."""

    def __init__(self, config: ResNetTinyConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.stem = _ConvBn(config.in_channels, w, 3)
        self.layer1 = _TinyBasicBlock(w, w, 1)
        self.layer2 = _TinyBasicBlock(w, 2 * w, 2)
        self.layer3 = _TinyInvertedResidual(2 * w, config.expand)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * w, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def build_resnet_tiny(**options: object) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``resnet_tiny``; options are :class:`ResNetTinyConfig` fields."""
    config = ResNetTinyConfig(**options)  # type: ignore[arg-type]  # validated by the dataclass
    example = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
    return ResNetTiny(config), (example,)


# ------------------------------------------------------------------------------- resnet18


class _BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (same attribute names, so its weights load)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` architecture (BasicBlock, [2, 2, 2, 2])."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        c_in = 64
        for i, width in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            layer = nn.Sequential(_BasicBlock(c_in, width, stride), _BasicBlock(width, width, 1))
            self.add_module(f"layer{i}", layer)
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = self.get_submodule(name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------- mobilenet_v3_small


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class _SqueezeExcitation(nn.Module):
    """torchvision's ``SqueezeExcitation`` with MobileNetV3's hard-sigmoid gate."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


# (input, kernel, expanded, output, squeeze-excite, hardswish, stride): torchvision's table.
_SMALL = (
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
)


class _InvertedResidualV3(nn.Module):
    def __init__(
        self, c_in: int, kernel: int, hidden: int, c_out: int, se: bool, hs: bool, stride: int
    ) -> None:
        super().__init__()
        act: Callable[[], nn.Module] = nn.Hardswish if hs else nn.ReLU
        bn = {"bn_eps": 0.001, "bn_momentum": 0.01}
        layers: list[nn.Module] = []
        if hidden != c_in:
            layers.append(_ConvBn(c_in, hidden, 1, activation=act, **bn))  # type: ignore[arg-type]
        layers.append(_ConvBn(hidden, hidden, kernel, stride, hidden, act, **bn))  # type: ignore[arg-type]
        if se:
            layers.append(_SqueezeExcitation(hidden, _make_divisible(hidden // 4)))
        layers.append(_ConvBn(hidden, c_out, 1, activation=None, **bn))  # type: ignore[arg-type]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3Small(nn.Module):
    """torchvision's ``mobilenet_v3_small`` architecture (width 1.0)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        bn = {"bn_eps": 0.001, "bn_momentum": 0.01}
        layers: list[nn.Module] = [_ConvBn(3, 16, 3, 2, activation=nn.Hardswish, **bn)]  # type: ignore[arg-type]
        layers += [_InvertedResidualV3(*row) for row in _SMALL]
        layers.append(_ConvBn(96, 576, 1, activation=nn.Hardswish, **bn))  # type: ignore[arg-type]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# -------------------------------------------------------------------------- factories


def calibrate_batchnorm(model: nn.Module, example: torch.Tensor, samples: int, seed: int) -> None:
    """Set every BatchNorm's running statistics from ``samples`` seeded Gaussian inputs
    shaped like ``example`` (one batch, cumulative averages), then return to eval mode."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((samples, *example.shape[1:]), generator=gen)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _load_weights(model: nn.Module, weights: str | None, name: str) -> bool:
    if weights is None:
        return False
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"model {name!r}: weights file {weights!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return True


def _imagenet_cnn(
    name: str,
    model: nn.Module,
    image_size: int,
    weights: str | None,
    bn_calibration_samples: int,
    seed: int,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    example = torch.zeros(1, 3, image_size, image_size)
    if not _load_weights(model, weights, name) and bn_calibration_samples > 0:
        calibrate_batchnorm(model, example, bn_calibration_samples, seed)
    return model.eval(), (example,)


def build_resnet18(
    num_classes: int = 1000,
    image_size: int = 224,
    weights: str | None = None,
    bn_calibration_samples: int = 8,
    seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``resnet18``; ``weights``: a local torchvision ``state_dict`` file."""
    torch.manual_seed(seed)
    model = ResNet18(num_classes)
    return _imagenet_cnn("resnet18", model, image_size, weights, bn_calibration_samples, seed)


def build_mobilenet_v3_small(
    num_classes: int = 1000,
    image_size: int = 224,
    weights: str | None = None,
    bn_calibration_samples: int = 8,
    seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``mobilenet_v3_small``; ``weights`` as for :func:`build_resnet18`."""
    torch.manual_seed(seed)
    model = MobileNetV3Small(num_classes)
    return _imagenet_cnn(
        "mobilenet_v3_small", model, image_size, weights, bn_calibration_samples, seed
    )
