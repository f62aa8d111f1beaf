"""Packing of sub-byte integers into bytes, exactly reversible.

The layout is one little-endian bit stream: value ``i`` occupies bits ``[b*i, b*(i+1))``
of the stream, byte ``j`` holds stream bits ``[8j, 8j+8)``. For 4 bits that is two values
per byte, low nibble first; for 2 bits four per byte, lowest pair first (both exactly the
layouts of ONNX ``int4``/``uint4``/``int2``/``uint2`` tensors); 3-bit values are packed
densely, eight values in three bytes (a value may straddle two bytes). ``n`` values take
``ceil(n * b / 8)`` bytes. Values are stored as two's complement codes when ``signed``.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = frozenset({1, 2, 3, 4, 5, 6, 7, 8})


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by ``n`` values of ``bits`` bits."""
    return (n * bits + 7) // 8


def _check(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit values; widths 1 to 8 pack into bytes")


def pack_bits(q: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Pack integer values of width ``bits`` (flat order) into a uint8 tensor.

    ``signed`` values must lie in ``[-2^(b-1), 2^(b-1)-1]``, unsigned in ``[0, 2^b-1]``;
    anything else raises ``ValueError``.
    """
    _check(bits)
    flat = q.flatten()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(
            f"pack_bits: {'signed' if signed else 'unsigned'} {bits}-bit values must lie in "
            f"[{lo}, {hi}]"
        )
    n = flat.numel()
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole values per byte, done in uint8
        per = 8 // bits
        codes8 = (flat.to(torch.int16) & (2**bits - 1)).to(torch.uint8)
        pad = (-n) % per
        if pad:
            codes8 = torch.cat([codes8, codes8.new_zeros(pad)])
        lanes = codes8.reshape(-1, per)
        out = lanes[:, 0].clone()
        for j in range(1, per):
            out |= lanes[:, j] << (bits * j)
        return out
    wide_dtype = torch.int32 if 8 * bits < 31 else torch.int64
    codes = flat.to(wide_dtype) & (2**bits - 1)
    pad = (-n) % 8
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    # Eight values make exactly `bits` bytes: assemble them in one 64-bit word per octet.
    octets = codes.reshape(-1, 8)
    shifts = torch.arange(8, dtype=wide_dtype) * bits
    words = (octets << shifts).sum(dim=1, dtype=wide_dtype)
    byte_shifts = torch.arange(bits, dtype=wide_dtype) * 8
    packed = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).flatten()
    return packed[: packed_size(n, bits)]


def unpack_bits(
    packed: torch.Tensor,
    bits: int,
    shape: torch.Size | tuple[int, ...],
    signed: bool = True,
) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int8 (signed) or uint8 (unsigned) values of ``shape``."""
    _check(bits)
    n = 1
    for d in shape:
        n *= d
    if packed.numel() < packed_size(n, bits):
        raise ValueError(
            f"unpack_bits: {packed.numel()} bytes hold fewer than {n} {bits}-bit values"
        )
    data = packed.flatten()[: packed_size(n, bits)]
    if 8 % bits == 0:  # whole values per byte: done in bytes, sign-extended by shifts
        per = 8 // bits
        if per == 1:
            codes8 = data if signed else data.clone()  # the signed path copies anyway
        else:
            lanes = [(data >> (bits * j)) & (2**bits - 1) for j in range(per)]
            codes8 = torch.stack(lanes, dim=1).flatten()[:n]
        if signed:  # the value's top bit moved to the byte's, then shifted back arithmetically
            spare = 8 - bits
            # (a dtype cast, not a view: the ONNX exporter traces this and has no dtype view)
            return ((codes8 << spare).to(torch.int8) >> spare).reshape(shape)
        return codes8.reshape(shape)
    else:
        wide_dtype = torch.int32 if 8 * bits < 31 else torch.int64
        wide = data.to(wide_dtype)
        pad = (-wide.numel()) % bits
        if pad:
            wide = torch.cat([wide, wide.new_zeros(pad)])
        byte_shifts = torch.arange(bits, dtype=wide_dtype) * 8
        words = (wide.reshape(-1, bits) << byte_shifts).sum(dim=1, dtype=wide_dtype)
        shifts = torch.arange(8, dtype=wide_dtype) * bits
        codes = ((words.unsqueeze(1) >> shifts) & (2**bits - 1)).flatten()[:n].to(torch.int16)
    if signed:
        codes = torch.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes)
        return codes.to(torch.int8).reshape(shape)
    return codes.to(torch.uint8).reshape(shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit values (int8 tensor in [-8, 7]) two per byte along the flat order.

    Returns a flat uint8 tensor of ``ceil(n / 2)`` bytes; low nibble first.
    """
    flat = q.flatten()
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    return pack_bits(flat, 4, signed=True)


def unpack_int4(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: an int8 tensor of ``shape``."""
    return unpack_bits(packed, 4, shape, signed=True)
