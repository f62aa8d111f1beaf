"""Packing of sub-byte integers: two 4-bit values per byte, exactly reversible."""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit values (int8 tensor in [-8, 7]) two per byte along the flat order.

    Returns a flat uint8 tensor of ``ceil(n / 2)`` bytes; low nibble first.
    """
    flat = q.flatten().to(torch.int16)
    if flat.numel() and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = (flat & 0xF).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: an int8 tensor of ``shape``."""
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    flat = torch.stack([low, high], dim=1).flatten()
    flat = torch.where(flat > 7, flat - 16, flat)
    n = 1
    for d in shape:
        n *= d
    return flat[:n].to(torch.int8).reshape(shape)
