"""A tiny transformer encoder classifier: the rows of a 28x28 image are its 28 tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class TransformerConfig:
    tokens: int = 28
    token_features: int = 28
    width: int = 64
    heads: int = 4
    layers: int = 2
    mlp_ratio: int = 4
    num_classes: int = 10


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        assert config.width % config.heads == 0, "width must be a multiple of heads"
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.width)
        self.fc = nn.Linear(config.width, config.mlp_ratio * config.width)
        self.out = nn.Linear(config.mlp_ratio * config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class TinyTransformer(nn.Module):
    """Token embedding + learned positions, pre-norm blocks, mean-pool, linear head."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.token_features, config.width)
        self.pos = nn.Parameter(torch.zeros(1, config.tokens, config.width))
        self.blocks = nn.Sequential(*(Block(config) for _ in range(config.layers)))
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(x) + self.pos)
        return self.head(self.ln_f(h).mean(dim=1))


def build_tiny_transformer(**options: object) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``tiny_transformer``; options are :class:`TransformerConfig` fields."""
    config = TransformerConfig(**options)  # type: ignore[arg-type]  # validated by the dataclass
    return TinyTransformer(config), (torch.zeros(1, config.tokens, config.token_features),)
