import itertools

import pytest
import torch

from quant_core.primitives import (
    decode_scale_int64,
    dequantize_weight,
    encode_scale_int64,
    get_decompose_dim,
    int_matmul,
    int_range,
    pack_int4_rows,
    pack_int4_words,
    quantize_per_token,
    quantize_static,
    quantize_weight_per_group,
    unpack_int4_rows,
    unpack_int4_words,
)


def test_int_ranges():
    assert int_range(8) == (-128, 127)
    assert int_range(4) == (-8, 7)


def test_pack_int4_rows_layout_and_round_trip():
    # Every (low, high) pair of int4 values: row 2j goes to the low nibble, row 2j+1 to the high nibble.
    pairs = torch.tensor(list(itertools.product(range(-8, 8), repeat=2)), dtype=torch.int8)  # [256, 2]
    values = pairs.T.contiguous()  # [2, 256]: row 0 low nibbles, row 1 high nibbles
    packed = pack_int4_rows(values)
    assert packed.shape == (1, 256) and packed.dtype == torch.int8
    raw = packed.view(torch.uint8).to(torch.int32)[0]
    assert torch.equal(raw & 0xF, (values[0].to(torch.int32) & 0xF))
    assert torch.equal(raw >> 4, (values[1].to(torch.int32) & 0xF))
    assert torch.equal(unpack_int4_rows(packed), values)
    big = torch.randint(-8, 8, (6, 5), dtype=torch.int8)
    assert torch.equal(unpack_int4_rows(pack_int4_rows(big)), big)


def test_pack_int4_rows_matches_msmodelslim_byte_example():
    # Byte 0x9E: low nibble 0xE = -2 (row 0), high nibble 0x9 = -7 (row 1); byte 0x70: 0 and 7.
    packed = torch.tensor([[0x9E - 256, 0x70]], dtype=torch.int8)
    assert unpack_int4_rows(packed).tolist() == [[-2, 0], [-7, 7]]


def test_pack_int4_rows_needs_even_rows():
    with pytest.raises(ValueError, match="even number of rows"):
        pack_int4_rows(torch.zeros(3, 4, dtype=torch.int8))


def test_pack_int4_words_layout_and_round_trip():
    values = torch.tensor([[1, -1, 2, -2, 3, -3, 7, -8]], dtype=torch.int8)
    word = pack_int4_words(values)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    expected = sum(((v & 0xF) << (4 * i)) for i, v in enumerate(values[0].tolist()))
    assert word.item() == expected - (1 << 32 if expected >= 1 << 31 else 0)
    many = torch.randint(-8, 8, (3, 4, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4_words(pack_int4_words(many)), many)
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_int4_words(torch.zeros(2, 12, dtype=torch.int8))


def test_int64_scale_codec():
    scales = torch.tensor([1e-3, 0.5, 3.0e-8, 65504.0, 1.0e30], dtype=torch.float32)
    encoded = encode_scale_int64(scales)
    assert encoded.dtype == torch.int64 and (encoded >= 0).all() and (encoded < 2**32).all()
    assert torch.equal(decode_scale_int64(encoded), scales)
    # The bit pattern, checked independently: 0.5 is 0x3F000000.
    assert encoded[1].item() == 0x3F000000


@pytest.mark.parametrize(
    ("k", "expected"),
    [(256, (16, 16)), (512, (16, 32)), (576, (24, 24)), (1536, (32, 48)), (2048, (32, 64)), (4096, (64, 64)),
     (5632, (64, 88)), (11008, (86, 128)), (14336, (112, 128)), (7, (1, 7))],
)  # fmt: skip
def test_get_decompose_dim_matches_the_format_table(k, expected):
    assert get_decompose_dim(k) == expected


@pytest.mark.parametrize("k", [2, 66, 4094, 0])
def test_get_decompose_dim_refuses_sizes_without_a_split(k):
    with pytest.raises(ValueError, match="difference of two squares"):  # the reference algorithm would loop forever
        get_decompose_dim(k)


def test_quantize_per_token_is_symmetric_and_handles_zero_rows():
    x = torch.tensor([[1.0, -2.0, 0.6], [0.0, 0.0, 0.0], [3.0, 3.0, -3.0]])
    q, s = quantize_per_token(x, 8)
    assert s[:, 0].tolist() == pytest.approx([2 / 127, 0.0, 3 / 127])
    assert q.tolist() == [[64, -127, 38], [0, 0, 0], [127, 127, -127]]
    q4, s4 = quantize_per_token(x, 4, clip_ratio=0.5)
    assert s4[0, 0].item() == pytest.approx(1 / 7)
    assert q4[0].tolist() == [7, -8, 4]  # clipped: -2 / (1/7) = -14 -> -8


def test_quantize_static_rounds_adds_offset_and_clamps():
    q = quantize_static(torch.tensor([0.0, 0.26, -10.0, 10.0]), torch.tensor([0.1]), torch.tensor([-2.0]))
    assert q.tolist() == [-2, 1, -102, 98]
    q = quantize_static(torch.tensor([100.0, -100.0]), torch.tensor([0.1]), torch.tensor([0.0]))
    assert q.tolist() == [127, -128]


def test_int_matmul_is_exact_at_the_extremes():
    k = 4096
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    assert (int_matmul(a, b) == 128 * 128 * k).all()


@pytest.mark.parametrize(("bits", "group", "symmetric", "bound"), [(8, 64, True, 0.01), (4, 32, False, 0.12)])
def test_per_group_weight_quantization_error(bits, group, symmetric, bound):
    # Gaussian weights: int8 symmetric per group ≈ 0.6 % rms error, int4 asymmetric g32 ≈ 8 % (cpu-kernels.md §5).
    w = torch.randn(48, 192, generator=torch.Generator().manual_seed(0))
    q, scale, offset = quantize_weight_per_group(w, bits, group, symmetric)
    lo, hi = int_range(bits)
    assert q.min() >= lo and q.max() <= hi
    assert scale.shape == offset.shape == (48, 192 // group)
    assert torch.equal(offset, offset.round())
    err = ((dequantize_weight(q, scale, offset) - w).norm() / w.norm()).item()
    assert err < bound


def test_per_group_requires_a_dividing_group():
    with pytest.raises(ValueError, match="divide in_features 576"):
        quantize_weight_per_group(torch.randn(4, 576), 4, 128)
