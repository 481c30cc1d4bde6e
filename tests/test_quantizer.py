"""Tests for kv_cache/quantizer.py: the packed layout, error bounds, odd shapes and validation.

Error bound tested elementwise (module docstring): with the *stored* fp16 scale of the element's group,

    |x - dequantized| <= scale / 2 + fp32 slack,

half a quantization step; the fp16 rounding of scale and zero is inside it, because zero is rounded down and scale
up, so the grid spans [min, max] and no code is clipped. The fp32 slack is 2**-20 * (|min| + |max|) of the group.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_cache.errors import CacheValidationError
from kv_cache.quantizer import (
    Quantizer,
    bits_of,
    dequantize_keys,
    dequantize_values,
    pack,
    packed_dim,
    quantize_keys,
    quantize_values,
    unpack,
)

BITS = (2, 4, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
# (head_dim, value group_size): real models' 64/80/96/128/256 and odd-but-valid ones; the group must divide head_dim.
HEAD_DIMS = ((128, 64), (256, 64), (80, 40), (96, 32), (72, 24), (40, 64), (12, 64))


def outlier_keys(tokens: int, kv_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    """fp32 `[tokens, kv_heads, head_dim]`: N(0, 1) plus a per-channel offset, 3 channels per head scaled x10-x50."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(tokens, kv_heads, head_dim, generator=gen) + torch.randn(kv_heads, head_dim, generator=gen)
    for head in range(kv_heads):
        channels = torch.randperm(head_dim, generator=gen)[:3]
        keys[:, head, channels] *= torch.empty(3).uniform_(10, 50, generator=gen)
    return keys


def same(first, second) -> bool:
    """Whether two (codes, scale, zero) triples are bitwise equal, wherever they live."""
    return all(torch.equal(a, b.to(a.device)) for a, b in zip(first, second, strict=True))


def assert_within_bound(x, deq, low, high, scale, bits):
    """|x - deq| <= scale / 2 + fp32 slack, elementwise; low/high (fp32 group min/max) and scale broadcast to x."""
    scale = scale.float()
    excess = (x - deq).abs() - (scale / 2 + 2**-20 * (low.abs() + high.abs()))
    assert excess.max() <= 0, f"bound exceeded by {excess.max():.3g}"
    # ... and the stored scale is the fp32 (max - min) / (2**bits - 1) up to fp16 rounding: zero down, scale up.
    zero_rounding = 2**-10 * low.abs() + 2**-24
    assert (scale <= (high - low + zero_rounding) / (2**bits - 1) * (1 + 2**-10) + 2**-24).all()


# --- packing -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_pack_covers_every_byte_exactly(bits):
    """All 256 bytes: slot k of byte b holds bits [k*bits, (k+1)*bits) of b, and unpack inverts pack."""
    per_byte = 8 // bits
    byte = torch.arange(256)
    codes = torch.stack([(byte >> (k * bits)) & (2**bits - 1) for k in range(per_byte)], dim=-1).to(torch.uint8)
    assert torch.equal(pack(codes, bits), byte.to(torch.uint8).unsqueeze(-1))
    assert torch.equal(unpack(byte.to(torch.uint8).unsqueeze(-1), bits, per_byte), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("head_dim", [hd for hd, _ in HEAD_DIMS] + [8, 64])
def test_pack_is_split_half_and_exact(bits, head_dim):
    """Byte j holds channel j + k * packed_dim in slot k, for every code value, with extra leading dims."""
    gen = torch.Generator().manual_seed(head_dim + bits)
    codes = torch.randint(0, 2**bits, (3, 5, 2, head_dim), generator=gen, dtype=torch.uint8)
    codes[0, 0, 0, :] = torch.arange(head_dim) % 2**bits
    packed = pack(codes, bits)
    width = packed_dim(head_dim, bits)
    assert packed.shape == (3, 5, 2, width) and packed.dtype == torch.uint8
    expected = sum(codes[..., k * width : (k + 1) * width].int() << (k * bits) for k in range(8 // bits))
    assert torch.equal(packed.int(), expected)
    assert torch.equal(unpack(packed, bits, head_dim), codes)


@pytest.mark.parametrize(("bits", "head_dim", "allowed"), [(4, 7, "multiple of 2"), (2, 6, "multiple of 4")])
def test_unpackable_head_dim_names_allowed_dims(bits, head_dim, allowed):
    with pytest.raises(CacheValidationError, match=f"head_dim={head_dim} .*INT{bits}.*{allowed}"):
        quantize_keys(torch.zeros(4, 1, head_dim), bits)
    with pytest.raises(CacheValidationError, match=allowed):
        Quantizer(bits).bytes_per_token(64, 1, head_dim)


def test_pack_rejects_out_of_range_codes_and_wrong_dtypes():
    with pytest.raises(CacheValidationError, match="codes hold 16, which does not fit in 4 bits"):
        pack(torch.full((2, 8), 16, dtype=torch.uint8), 4)
    with pytest.raises(CacheValidationError, match="codes must be uint8"):
        pack(torch.zeros(2, 8, dtype=torch.int32), 4)
    with pytest.raises(CacheValidationError, match=r"uint8 \[\.\.\., 4\] for head_dim=8 at INT4"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


# --- round trip ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("head_dim", "group_size"), HEAD_DIMS)
def test_keys_round_trip_within_bound(device, dtype, bits, head_dim, group_size):
    keys = outlier_keys(64, 4, head_dim, seed=bits * head_dim).to(device=device, dtype=dtype)
    q = quantize_keys(keys, bits)
    assert q.codes.shape == (64, 4, packed_dim(head_dim, bits)) and q.codes.dtype == torch.uint8
    assert q.scale.shape == q.zero.shape == (4, head_dim) and q.scale.dtype == q.zero.dtype == torch.float16
    deq = dequantize_keys(*q, head_dim)
    assert deq.shape == keys.shape and deq.dtype == torch.float32 and deq.device == keys.device
    x = keys.float()
    low, high = torch.aminmax(x, dim=0)
    assert_within_bound(x, deq, low, high, q.scale, bits)
    assert ((x - deq).abs() / q.scale.float()).max() > 0.45  # the bound is tight: errors reach half a step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("head_dim", "group_size"), HEAD_DIMS)
def test_values_round_trip_within_bound(device, dtype, bits, head_dim, group_size):
    gen = torch.Generator().manual_seed(bits + head_dim)
    values = (3 * torch.randn(64, 4, head_dim, generator=gen)).to(device=device, dtype=dtype)
    q = quantize_values(values, bits, group_size)
    group = min(group_size, head_dim)
    assert q.codes.shape == (64, 4, packed_dim(head_dim, bits))
    assert q.scale.shape == q.zero.shape == (64, 4, head_dim // group) and q.scale.dtype == torch.float16
    deq = dequantize_values(*q, head_dim)
    grouped = values.float().unflatten(-1, (head_dim // group, group))
    low, high = (t.unsqueeze(-1) for t in torch.aminmax(grouped, dim=-1))
    assert_within_bound(grouped, deq.unflatten(-1, grouped.shape[-2:]), low, high, q.scale.unsqueeze(-1), bits)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    tokens=st.integers(1, 20),
    offset=st.floats(-1000, 1000),
    magnitude=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_bound_holds_at_any_scale(bits, tokens, offset, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    x = offset + magnitude * torch.randn(tokens, 2, 16, generator=gen)
    q = quantize_keys(x, bits)
    low, high = torch.aminmax(x, dim=0)
    assert_within_bound(x, dequantize_keys(*q, 16), low, high, q.scale, bits)


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_is_codes_times_stored_fp16_scale_plus_zero(bits):
    """The contract the kernels reproduce: fp32 math on the stored fp16 scale and zero, nothing kept aside."""
    keys, values = outlier_keys(64, 2, 128, seed=1), torch.randn(64, 2, 128)
    k, v = quantize_keys(keys, bits), quantize_values(values, bits)
    codes_k, codes_v = unpack(k.codes, bits, 128).float(), unpack(v.codes, bits, 128).float()
    assert torch.equal(dequantize_keys(*k, 128), codes_k * k.scale.float() + k.zero.float())
    v_scale, v_zero = (t.float().repeat_interleave(64, dim=-1) for t in (v.scale, v.zero))
    assert torch.equal(dequantize_values(*v, 128), codes_v * v_scale + v_zero)


def test_per_channel_keys_isolate_outlier_channels():
    """Why keys are per channel: grouping them per token lets one x50 channel blow up every channel's error."""
    keys = outlier_keys(64, 4, 128, seed=3)
    per_channel = (dequantize_keys(*quantize_keys(keys, 4), 128) - keys).abs().mean()
    per_token = (dequantize_values(*quantize_values(keys, 4), 128) - keys).abs().mean()
    assert per_channel * 4 < per_token


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_single_token_and_constant_groups_are_exact(bits, dtype):
    one = outlier_keys(1, 2, 64, seed=4).to(dtype)
    assert torch.equal(dequantize_keys(*quantize_keys(one, bits), 64), one.float())
    q = quantize_keys(one, bits)
    assert torch.count_nonzero(q.scale) == 0
    constant = torch.full((16, 2, 64), -2.75, dtype=dtype)
    constant[:, 1, :32] = 7.5
    assert torch.equal(dequantize_keys(*quantize_keys(constant, bits), 64), constant.float())
    assert torch.equal(dequantize_values(*quantize_values(constant, bits, 32), 64), constant.float())
    zeros = torch.zeros(3, 1, 64, dtype=dtype)
    assert torch.equal(dequantize_values(*quantize_values(zeros, bits), 64), zeros.float())


def test_single_token_fp32_keys_within_bound_of_a_tiny_scale():
    """fp32 values fp16 cannot hold: zero rounds down, the tiny scale covers the gap, closer than fp16 rounding."""
    one = torch.randn(1, 2, 64)
    q = quantize_keys(one, 4)
    error = (dequantize_keys(*q, 64) - one).abs()
    assert (error <= q.scale.float() / 2 + 2**-20 * one.abs()).all()
    assert error.max() <= (one.half().float() - one).abs().max()


@pytest.mark.parametrize("bits", BITS)
def test_empty_input(bits):
    q = quantize_keys(torch.empty(0, 2, 32), bits)
    assert q.codes.shape == (0, 2, packed_dim(32, bits)) and q.scale.shape == (2, 32)
    assert dequantize_keys(*q, 32).shape == (0, 2, 32)
    q = quantize_values(torch.empty(0, 2, 32, dtype=torch.bfloat16), bits)
    assert q.codes.shape == (0, 2, packed_dim(32, bits)) and q.scale.shape == (0, 2, 1)
    assert dequantize_values(*q, 32).shape == (0, 2, 32)


@pytest.mark.parametrize("bits", BITS)
def test_leading_block_dims_quantize_each_block_alone(bits):
    blocks = torch.stack([outlier_keys(16, 2, 32, seed=s) for s in range(3)])  # [num_blocks, tokens, kv_heads, dim]
    before = blocks.clone()
    k, v = quantize_keys(blocks, bits), quantize_values(blocks, bits, 16)
    assert k.scale.shape == (3, 2, 32) and v.scale.shape == (3, 16, 2, 2)
    for i in range(3):
        assert same([t[i] for t in k], quantize_keys(blocks[i], bits))
        assert same([t[i] for t in v], quantize_values(blocks[i], bits, 16))
    assert torch.equal(dequantize_keys(*k, 32)[1], dequantize_keys(*quantize_keys(blocks[1], bits), 32))
    assert torch.equal(dequantize_values(*v, 32)[2], dequantize_values(*quantize_values(blocks[2], bits, 16), 32))
    assert torch.equal(blocks, before)  # inputs are never written


# --- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_rejected(dtype, poison):
    x = torch.randn(8, 2, 16).to(dtype)
    x[3, 1, 5] = poison
    with pytest.raises(CacheValidationError, match="keys contain 1 NaN/Inf values out of 256"):
        quantize_keys(x, 4)
    with pytest.raises(CacheValidationError, match="values contain 1 NaN/Inf"):
        Quantizer(8).quantize_values(x)


def test_fp16_overflow_of_zero_is_rejected():
    x = torch.randn(8, 2, 16)
    x[0, 0, 0] = -1e5
    with pytest.raises(CacheValidationError, match="overflow the fp16 zero or scale"):
        quantize_keys(x, 4)
    x[0, 0, 0] = 1e5  # zero = min stays finite, scale = range / 15 too: representable, so accepted
    quantize_keys(x, 4)


@pytest.mark.parametrize("bits", [3, 0, 16, True, 4.0, "4"])
def test_unsupported_bits(bits):
    message = f"bits={bits!r} is not supported; use 2, 4 or 8"
    with pytest.raises(CacheValidationError, match=message.replace(".", r"\.")):
        Quantizer(bits=bits)
    with pytest.raises(CacheValidationError, match="use 2, 4 or 8"):
        quantize_keys(torch.zeros(2, 1, 8), bits)


def test_bits_3_message_is_exact():
    with pytest.raises(CacheValidationError) as error:
        Quantizer(bits=3)
    assert str(error.value) == "bits=3 is not supported; use 2, 4 or 8"


def test_group_size_validation():
    with pytest.raises(CacheValidationError, match="group_size=0 must be a positive"):
        Quantizer(4, group_size=0)
    with pytest.raises(CacheValidationError, match=r"head_dim=80 is not divisible by group_size=64.*e\.g\. 40"):
        quantize_values(torch.zeros(2, 1, 80), 4)
    with pytest.raises(CacheValidationError, match="head_dim=96 is not divisible by group_size=64"):
        Quantizer(4).value_groups(96)
    assert Quantizer(4).value_groups(40) == 1 and Quantizer(4, group_size=32).value_groups(96) == 3


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (torch.zeros(4, 8), r"keys must be fp32/fp16/bf16 \[\.\.\., tokens, kv_heads, head_dim\]"),
        (torch.zeros(4, 1, 8, dtype=torch.int32), "torch.int32"),
        (torch.zeros(4, 1, 8, dtype=torch.float64), "torch.float64"),
    ],
)
def test_bad_input_tensors(tensor, match):
    with pytest.raises(CacheValidationError, match=match):
        quantize_keys(tensor, 4)


def test_dequantize_checks_codes_and_stats():
    q = quantize_values(torch.randn(4, 2, 64), 4, 32)
    with pytest.raises(CacheValidationError, match="packs head_dim=48 at no supported width"):
        dequantize_values(*q, 48)
    with pytest.raises(CacheValidationError, match=r"value zero must be fp16 \[4, 2, 2\]"):
        dequantize_values(q.codes, q.scale, q.zero.float(), 64)
    with pytest.raises(CacheValidationError, match="does not divide head_dim=64"):
        dequantize_values(q.codes, q.scale[..., :0], q.zero[..., :0], 64)
    with pytest.raises(CacheValidationError, match="packed at INT4 but this Quantizer has bits=2"):
        Quantizer(2).dequantize_values(*q, 64)
    with pytest.raises(CacheValidationError, match=r"value scale must be \[\.\.\., 1\] \(head_dim // group_size\)"):
        Quantizer(4, group_size=64).dequantize_values(*q, 64)
    k = quantize_keys(torch.randn(4, 2, 64), 2)
    assert bits_of(k.codes, 64) == 2
    with pytest.raises(CacheValidationError, match=r"key scale must be fp16 \[2, 64\]"):
        dequantize_keys(k.codes, k.scale[:1], k.zero, 64)


# --- Quantizer and bytes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_amp", [False, True])
def test_quantizer_wraps_the_functions(use_amp):
    quantizer = Quantizer(bits=4, group_size=32, use_amp=use_amp)
    keys, values = outlier_keys(64, 2, 64, seed=7).bfloat16(), torch.randn(64, 2, 64, dtype=torch.float16)
    k, v = quantizer.quantize_keys(keys), quantizer.quantize_values(values)
    assert same(k, quantize_keys(keys, 4))
    assert same(v, quantize_values(values, 4, 32))
    assert torch.equal(quantizer.dequantize_keys(*k, 64), dequantize_keys(*k, 64))
    assert torch.equal(quantizer.dequantize_values(*v, 64), dequantize_values(*v, 64))
    assert quantizer.packed_dim(64) == 32
    with torch.autocast("cpu", enabled=use_amp):  # a model under autocast: the same codes either way
        assert same(quantizer.quantize_keys(keys), k) and same(quantizer.quantize_values(values), v)
    with pytest.raises(CacheValidationError, match="use_amp=1 must be True or False"):
        Quantizer(use_amp=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bits", "per_element", "max_ratio"), [(8, 1.0625, 0.54), (4, 0.5625, 0.30), (2, 0.3125, 0.18)]
)
def test_bytes_per_token_matches_the_arithmetic(bits, per_element, max_ratio):
    """INT4, head_dim 128, block 64, group 64: 0.5 + 4/64 bytes per element for K and for V (PERFORMANCE.md 2)."""
    quantizer = Quantizer(bits, group_size=64)
    kv_heads, head_dim, block_size = 8, 128, 64
    elements = 2 * kv_heads * head_dim  # K and V of one token
    assert quantizer.bytes_per_token(block_size, kv_heads, head_dim) == per_element * elements
    assert quantizer.bytes_per_token(block_size, kv_heads, head_dim) / (2 * elements) <= max_ratio


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("block_size", "head_dim", "group_size"), [(64, 128, 64), (16, 80, 40), (5, 12, 64)])
def test_bytes_per_block_counts_the_real_tensors(bits, block_size, head_dim, group_size):
    quantizer = Quantizer(bits, group_size=group_size)
    block = torch.randn(block_size, 3, head_dim)
    stored = [*quantizer.quantize_keys(block), *quantizer.quantize_values(block)]
    assert quantizer.bytes_per_block(block_size, 3, head_dim) == sum(t.nbytes for t in stored)
    with pytest.raises(CacheValidationError, match="block_size=0 must be a positive integer"):
        quantizer.bytes_per_token(0, 3, head_dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("bits", BITS)
def test_cuda_matches_cpu(bits):
    keys, values = outlier_keys(64, 4, 128, seed=9), torch.randn(64, 4, 128)
    k_cpu, k_gpu = quantize_keys(keys, bits), quantize_keys(keys.cuda(), bits)
    v_cpu, v_gpu = quantize_values(values, bits), quantize_values(values.cuda(), bits)
    assert same(k_cpu, k_gpu) and same(v_cpu, v_gpu)
    assert torch.equal(dequantize_keys(*k_cpu, 128), dequantize_keys(*k_gpu, 128).cpu())
    assert torch.equal(dequantize_values(*v_cpu, 128), dequantize_values(*v_gpu, 128).cpu())
