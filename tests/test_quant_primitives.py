"""Affine per-group quantization, integer widths, float formats and bit packing."""

from __future__ import annotations

import pytest
import torch

from qatbench.quant.affine import (
    FLOAT_DTYPES,
    INT_BITS,
    check_bits,
    dequantize_per_group,
    float_round_trip,
    int_range,
    quantize_per_group,
    quantize_weight_per_channel,
    storage_dtype,
)
from qatbench.quant.packing import pack_bits, pack_int4, packed_size, unpack_bits

# ---- integer widths -------------------------------------------------------------------


@pytest.mark.parametrize("bits", sorted(INT_BITS))
def test_int_range_of_every_width(bits: int) -> None:
    assert int_range(bits, signed=True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert int_range(bits, signed=False) == (0, 2**bits - 1)
    check_bits(bits)


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 32])
def test_unsupported_widths_are_rejected(bits: int) -> None:
    with pytest.raises(ValueError, match="not supported"):
        check_bits(bits)
    with pytest.raises(ValueError, match="not supported"):
        quantize_per_group(torch.ones(2, 4), bits)


def test_storage_dtypes() -> None:
    assert storage_dtype(4, signed=True) == torch.int8
    assert storage_dtype(8, signed=False) == torch.uint8
    assert storage_dtype(16, signed=True) == torch.int16
    assert storage_dtype(16, signed=False) == torch.int32


# ---- per-group affine quantization, by hand --------------------------------------------


def test_symmetric_groups_by_hand() -> None:
    w = torch.tensor([[3.5, -7.0, 2.5, 7.0], [-1.75, 0.875, 0.5, 0.5]])
    gq = quantize_per_group(w, 4, group_size=2, symmetric=True)
    # scale = absmax / 7 per group of two: 1, 1, 0.25 and 0.5 / 7
    assert torch.allclose(gq.scale, torch.tensor([[1.0, 1.0], [0.25, 0.5 / 7]]))
    assert gq.zero_point is None and gq.symmetric
    # ties round half to even: 3.5 -> 4, 2.5 -> 2, 0.875 / 0.25 = 3.5 -> 4
    assert gq.q.tolist() == [[4, -7, 2, 7], [-7, 4, 7, 7]]
    assert gq.q.dtype == torch.int8


def test_asymmetric_groups_by_hand() -> None:
    w = torch.tensor([[-1.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0]])
    gq = quantize_per_group(w, 2, group_size=4, symmetric=False)
    # [-1, 2] over 3 steps: scale 1, zero point 1; [0, 3]: scale 1, zero point 0
    assert gq.scale.tolist() == [[1.0, 1.0]]
    assert gq.zero_point is not None and gq.zero_point.tolist() == [[1, 0]]
    assert gq.q.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert torch.equal(gq.dequantize(), w)


def test_per_channel_group_matches_existing_per_channel_helper() -> None:
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))
    gq = quantize_per_group(w, 4, group_size=None)
    q, scale = quantize_weight_per_channel(w, 4)
    assert torch.equal(gq.q, q)
    assert torch.allclose(gq.scale[:, 0], scale)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16, 32])
def test_round_trip_error_within_half_a_step(
    bits: int, symmetric: bool, group_size: int | None
) -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits)) * 3
    gq = quantize_per_group(w, bits, group_size, symmetric)
    lo, hi = int_range(bits, signed=True) if symmetric else int_range(bits, signed=False)
    assert int(gq.q.min()) >= lo and int(gq.q.max()) <= hi
    size = 64 if group_size is None else group_size
    err = (gq.dequantize() - w).abs().reshape(8, -1, size).amax(-1)
    slack = 1e-5 * float(w.abs().max())
    assert torch.all(err <= gq.scale / 2 + slack)
    assert torch.equal(
        dequantize_per_group(gq.q, gq.scale, gq.zero_point, group_size), gq.dequantize()
    )


def test_group_size_must_divide_the_input_features() -> None:
    with pytest.raises(ValueError, match="group_size 32 does not divide the 48 input features"):
        quantize_per_group(torch.ones(2, 48), 4, group_size=32)


def test_sixteen_bits_are_nearly_lossless() -> None:
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    gq = quantize_per_group(w, 16, group_size=16)
    assert gq.q.dtype == torch.int16
    assert float((gq.dequantize() - w).abs().max()) < 1e-4


# ---- floating-point formats ---------------------------------------------------------------


def test_float_formats_are_available() -> None:
    assert {"fp16", "bf16", "fp8_e4m3", "fp8_e5m2"} <= set(FLOAT_DTYPES)


def test_float_round_trips_by_hand() -> None:
    x = torch.tensor([0.1, 1.5, 0.125, 1000.0, -1000.0])
    assert torch.equal(float_round_trip(x, "fp16"), x.half().float())
    bf16 = float_round_trip(x, "bf16")
    assert bf16[1] == 1.5 and bf16[2] == 0.125  # exactly representable values survive
    assert bf16[0] == 0.10009765625  # 0.1 with 8 mantissa bits
    e4m3 = float_round_trip(x, "fp8_e4m3")
    assert e4m3.tolist() == [0.1015625, 1.5, 0.125, 448.0, -448.0]  # saturates at 448
    e5m2 = float_round_trip(x, "fp8_e5m2")
    assert e5m2.tolist() == [0.09375, 1.5, 0.125, 1024.0, -1024.0]
    assert float_round_trip(torch.tensor([1e6]), "fp8_e5m2").item() == 57344.0
    assert float_round_trip(torch.tensor([1e6]), "fp8_e5m2", saturate=False).item() == float("inf")


def test_unknown_float_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="fp4"):
        float_round_trip(torch.ones(1), "fp4")


# ---- packing --------------------------------------------------------------------------------


def test_packing_by_hand() -> None:
    assert pack_bits(torch.tensor([0, 1, 2, 3]), 2, signed=False).tolist() == [0xE4]
    # -2, -1, 0, 1 as two's complement pairs 10 11 00 01, lowest pair first
    assert pack_bits(torch.tensor([-2, -1, 0, 1]), 2, signed=True).tolist() == [0x4E]
    # eight 3-bit values fill three bytes: 1 | 2<<3 | 3<<6 | ... = 0x1F58D1
    packed = pack_bits(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3, signed=False)
    assert packed.tolist() == [0xD1, 0x58, 0x1F]
    # a value straddles a byte: 100 011 111 -> 0b1_1101_1100
    assert pack_bits(torch.tensor([-4, 3, -1]), 3, signed=True).tolist() == [0xDC, 0x01]
    # 4 bits is the existing two-per-byte, low-nibble-first layout
    q = torch.tensor([-8, 7, 7, -8, 0, -1, 1], dtype=torch.int8)
    assert torch.equal(pack_bits(q, 4), pack_int4(q))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5), (16, 9), (2, 3, 11)])
def test_pack_round_trip_is_exact(bits: int, signed: bool, shape: tuple[int, ...]) -> None:
    lo, hi = int_range(bits, signed) if bits > 1 or not signed else (-1, 0)
    gen = torch.Generator().manual_seed(bits * 100 + len(shape))
    q = torch.randint(lo, hi + 1, shape, generator=gen)
    packed = pack_bits(q, bits, signed)
    n = q.numel()
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(n, bits) == (n * bits + 7) // 8
    back = unpack_bits(packed, bits, q.shape, signed)
    assert back.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(back.to(torch.int64), q)


def test_packed_sizes_are_dense() -> None:
    assert packed_size(8, 3) == 3
    assert packed_size(5, 3) == 2
    assert packed_size(4096 * 4096, 2) == 4096 * 4096 // 4


@pytest.mark.parametrize(("bits", "signed", "bad"), [(2, True, 2), (2, False, 4), (3, True, -5)])
def test_pack_rejects_out_of_range(bits: int, signed: bool, bad: int) -> None:
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor([0, bad]), bits, signed)


def test_pack_rejects_widths_beyond_a_byte() -> None:
    with pytest.raises(ValueError, match="widths 1 to 8"):
        pack_bits(torch.tensor([0]), 9)


def test_unpack_rejects_short_buffers() -> None:
    with pytest.raises(ValueError, match="fewer than"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, (8,))
