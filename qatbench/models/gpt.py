"""A nanoGPT-style decoder-only language model, with a static KV cache for generation.

One :class:`GPTConfig`, modules built from it: token and position embeddings, pre-norm
blocks of causal self-attention and a GELU MLP, a final LayerNorm and an LM head whose
weight is tied to the token embedding (``tie_embeddings``). Every projection is an
``nn.Linear``, so every quantization method sees them.

``forward(idx)`` maps token ids ``[batch, time]`` to logits ``[batch, time, vocab]``.
``step(idx, pos, cache)`` is the generation path: it runs ``idx`` placed at positions
``pos, pos+1, ...`` against a preallocated cache ``[batch, 2*layers, heads, length, head]``
and returns the logits and the keys and values of the new tokens, which the caller writes
into the cache. Every shape in ``step`` is static, so it exports to ONNX with the cache as
an ordinary input and onnxruntime decodes with a KV cache too.

Presets: ``gpt_tiny`` (tests: trains in seconds), ``gpt_small`` (the LLM experiment: six
epochs, about three minutes on one core, to a byte perplexity of 4.9 on the shipped corpus;
at this budget two layers learn far faster than four, which sit for hundreds of steps at
the unigram plateau)
and ``gpt2_small_shape`` (GPT-2 small's 12 layers, 12 heads, width 768, context 1024 and
50,257-token vocabulary: for speed, too big to train here).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # byte-level text
    context: int = 128  # longest sequence; the position embedding's length
    layers: int = 4
    heads: int = 4
    width: int = 128
    mlp_ratio: int = 4
    bias: bool = True
    tie_embeddings: bool = True  # LM head shares the token embedding's weight
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        for name in ("vocab_size", "context", "layers", "heads", "width", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


EXAMPLE_TOKENS = 128  # the example input's length, at most (see build_gpt)
PRESETS: dict[str, GPTConfig] = {
    "gpt_tiny": GPTConfig(context=64, layers=2, heads=2, width=64),
    "gpt_small": GPTConfig(context=128, layers=2, heads=4, width=128),
    "gpt2_small_shape": GPTConfig(vocab_size=50257, context=1024, layers=12, heads=12, width=768),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=config.bias)
        self.proj = nn.Linear(config.width, config.width, bias=config.bias)
        self.dropout = config.dropout

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        return tuple(  # type: ignore[return-value]  # three tensors, as unpacked above
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v)
        )

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, h, t, d = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, h * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(x)
        p = self.dropout if self.training else 0.0
        return self._merge(F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True))

    def step(
        self,
        x: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        slots: torch.Tensor,
        written: torch.Tensor,
        allowed: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend from the new tokens to the cache with the new keys and values in place.

        ``slots[b, t]`` is the index among the new tokens that lands at cache position
        ``t``, valid where ``written[b, t]``; ``allowed[b, s, t]`` is the causal mask.
        """
        q, k, v = self._split(x)
        b, h, _, d = k.shape
        index = slots[:, None, :, None].expand(b, h, slots.shape[1], d)
        where = written[:, None, :, None]
        k_all = torch.where(where, k.gather(2, index), cache_k)
        v_all = torch.where(where, v.gather(2, index), cache_v)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed[:, None])
        return self._merge(y), k, v


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.width, bias=config.bias)
        self.fc = nn.Linear(config.width, config.mlp_ratio * config.width, bias=config.bias)
        self.out = nn.Linear(config.mlp_ratio * config.width, config.width, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(self.ln_2(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.mlp(x)


class GPT(nn.Module):
    """Decoder-only transformer language model (nanoGPT's ``model.py`` shape)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.width)
        self.wpe = nn.Embedding(config.context, config.width)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width, bias=config.bias)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual outputs
            if name.endswith(("attn.proj.weight", "out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.layers))
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    # -- generation with a static KV cache ---------------------------------------------

    @property
    def context(self) -> int:
        return self.config.context

    def new_cache(self, batch: int, length: int) -> torch.Tensor:
        """A zeroed cache for ``length`` positions: ``[batch, 2*layers, heads, length, d]``."""
        c = self.config
        if length > c.context:
            raise ValueError(f"cache length {length} exceeds the context of {c.context}")
        dtype = self.wte.weight.dtype
        return torch.zeros(batch, 2 * c.layers, c.heads, length, c.width // c.heads, dtype=dtype)

    def step(
        self, idx: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run tokens ``idx [b, s]`` placed at ``pos [b] .. pos+s-1`` against ``cache``.

        Returns logits ``[b, s, vocab]`` and the new keys and values
        ``[b, 2*layers, heads, s, d]`` for the caller to store at ``cache[:, :, :, pos:pos+s]``.
        The cache itself is not modified (an exported graph cannot write to its input).
        """
        s, length = idx.shape[1], cache.shape[3]
        positions = pos[:, None] + torch.arange(s, device=idx.device)  # [b, s]
        slot = torch.arange(length, device=idx.device)[None, :] - pos[:, None]  # [b, T]
        written = (slot >= 0) & (slot < s)
        slots = slot.clamp(0, s - 1)
        allowed = torch.arange(length, device=idx.device)[None, None, :] <= positions[:, :, None]
        x = self.wte(idx) + self.wpe(positions)
        new: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            assert isinstance(block, Block)
            y, k, v = block.attn.step(
                block.ln_1(x), cache[:, 2 * i], cache[:, 2 * i + 1], slots, written, allowed
            )
            x = x + y
            x = x + block.mlp(x)
            new += [k, v]
        return self.lm_head(self.ln_f(x)), torch.stack(new, dim=1)


def _config(preset: str | None, options: dict[str, object]) -> GPTConfig:
    base = PRESETS[preset] if preset else GPTConfig()
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown GPT option(s) {unknown}; allowed: {sorted(known)}")
    return dataclasses.replace(base, **options)  # type: ignore[arg-type]  # checked by the config


def build_gpt(
    preset: str | None = None, **options: object
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``gpt``: a :class:`GPTConfig` from ``preset`` and the options given.

    The example input is one sequence of up to ``EXAMPLE_TOKENS`` token ids (the context,
    if shorter); a trial replaces it with a sequence of the text data's length. The
    example is run once to check the model's output, and at GPT-2's 1,024-token context
    that forward alone took 3 of a trial's seconds.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r}; known: {sorted(PRESETS)}")
    config = _config(preset, options)
    return GPT(config), (torch.zeros(1, min(config.context, EXAMPLE_TOKENS), dtype=torch.long),)


def build_gpt_tiny(**options: object) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``gpt_tiny``: 2 layers, 2 heads, width 64, context 64 (tests)."""
    return build_gpt("gpt_tiny", **options)


def build_gpt_small(**options: object) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``gpt_small``: 2 layers, 4 heads, width 128, context 128."""
    return build_gpt("gpt_small", **options)


def build_gpt2_small_shape(**options: object) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Registered as ``gpt2_small_shape``: GPT-2 small's shape (124M parameters)."""
    return build_gpt("gpt2_small_shape", **options)
