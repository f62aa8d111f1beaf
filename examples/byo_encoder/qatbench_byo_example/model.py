"""A small sentence encoder with two integer inputs, as a user would bring it.

``build_encoder`` is the model factory named in the experiment: it returns the model and
its example inputs as a dict of named tensors (token ids and an attention mask, int64).
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        keep = mask[:, None, None, :].bool()
        attn = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep
        )
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class TinyEncoder(nn.Module):
    """Token and position embeddings, pre-norm blocks, masked mean pooling."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)
        for block in self.blocks:
            x = block(x, attention_mask)
        weights = attention_mask.unsqueeze(-1).to(x.dtype)
        return (self.norm(x) * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def build_encoder(
    vocab_size: int = 2048, dim: int = 128, layers: int = 2, heads: int = 4, seq_len: int = 32
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the same random weights in every trial: a stand-in for a checkpoint
    model = TinyEncoder(vocab_size, dim, layers, heads, seq_len).eval()
    example = {
        "input_ids": torch.randint(0, vocab_size, (1, seq_len)),
        "attention_mask": torch.ones(1, seq_len, dtype=torch.long),
    }
    return model, example
