"""`kv_cache.tiers.codec`: every block format round-trips bit-exactly; every damaged or foreign value decodes to None.

The pool side is `BlockPool.export_blocks` / `import_blocks`: a block's tensors are `layer.tensors()` of each layer
indexed at the block id, in order, and importing copies them back.
"""

from __future__ import annotations

import dataclasses
import functools
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_cache.block_format import BlockFormat, DenseBlocks
from kv_cache.block_pool import BlockPool
from kv_cache.errors import CacheValidationError
from kv_cache.tiers.codec import (
    HEADER,
    MAGIC,
    VERSION,
    block_layout,
    decode_block,
    encode_block,
    format_fingerprint,
    token_digest,
)

CPU = torch.device("cpu")
DENSE = {name: BlockFormat(4, 2, 2, 8, dtype) for name, dtype in [
    ("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)
]}  # fmt: skip
QUANTIZED = {
    "int8": BlockFormat(8, 2, 2, 16, torch.float16, layer_bits=(8, 8), group_size=8),
    "int4": BlockFormat(8, 2, 2, 16, torch.bfloat16, layer_bits=(4, 4), group_size=8),
    "int2": BlockFormat(8, 2, 2, 16, torch.float16, layer_bits=(2, 2), group_size=16),
    "mixed": BlockFormat(8, 3, 2, 16, torch.float16, layer_bits=(8, 4, 2), group_size=8),
}
FORMATS = {**DENSE, **QUANTIZED}
SMALL = BlockFormat(4, 2, 2, 8, torch.bfloat16)


def export_block(pool: BlockPool, block_id: int) -> list[torch.Tensor]:
    return pool.export_blocks([block_id])[0]


def filled_pool(block_format: BlockFormat, num_blocks: int, seed: int) -> BlockPool:
    """A pool of `num_blocks` blocks holding random keys/values (quantized formats through their encoder)."""
    generator = torch.Generator().manual_seed(seed)
    fmt = block_format
    pool = BlockPool(fmt, num_blocks, CPU)
    shape = (num_blocks, fmt.block_size, fmt.kv_heads, fmt.head_dim)
    for layer in pool.layers:
        keys = torch.randn(shape, generator=generator) * 3
        values = torch.randn(shape, generator=generator)
        if isinstance(layer, DenseBlocks):
            layer.keys.copy_(keys)
            layer.values.copy_(values)
            layer.keys.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])  # raw bit patterns survive
        else:
            for tensor, encoded in zip(layer.tensors(), layer.encode(keys, values), strict=True):
                tensor.copy_(encoded)
    return pool


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of `tensor` (so NaN == NaN and -0.0 != 0.0)."""
    return tensor.contiguous().view(torch.uint8)


def tokens(block_format: BlockFormat, start: int = 0) -> list[int]:
    return list(range(start, start + block_format.block_size))


@functools.cache
def value_of(block_format: BlockFormat) -> bytes:
    """The encoded block 0 of a seeded pool (cached: values are immutable bytes)."""
    return encode_block(block_format, export_block(filled_pool(block_format, 1, seed=0), 0), tokens(block_format))


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_through_the_pool_is_bit_exact(name: str) -> None:
    fmt = FORMATS[name]
    source, target = filled_pool(fmt, 3, seed=1), BlockPool(fmt, 4, CPU)
    value = encode_block(fmt, export_block(source, 1), tokens(fmt, 7))
    assert value[:4] == MAGIC and len(value) == HEADER.size + fmt.bytes_per_block  # compact: header + raw bytes

    decoded = decode_block(value, fmt, tokens(fmt, 7))
    assert decoded is not None
    target.import_blocks([2], [decoded])
    for got, want in zip(export_block(target, 2), export_block(source, 1), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(bits(got), bits(want))
    for layer_source, layer_target in zip(source.layers, target.layers, strict=True):  # the pool reads K/V back
        for got, want in zip(layer_target.read(torch.tensor([2])), layer_source.read(torch.tensor([1])), strict=True):
            assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("name", FORMATS)
def test_layout_covers_every_byte_of_the_format(name: str) -> None:
    fmt = FORMATS[name]
    layout = block_layout(fmt)
    assert len(layout) == fmt.num_layers * (2 if fmt.layer_bits is None else 6)
    assert sum(spec.nbytes for spec in layout) == fmt.bytes_per_block


def test_decoded_tensors_are_private_writable_copies() -> None:
    value = value_of(SMALL)
    first, second = decode_block(value, SMALL, tokens(SMALL)), decode_block(value, SMALL, tokens(SMALL))
    assert first is not None and second is not None
    first[0].fill_(1)  # writable, and shares memory with neither `value` nor another decode
    assert not torch.equal(bits(first[0]), bits(second[0]))
    assert decode_block(value, SMALL, tokens(SMALL)) is not None


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_flipped_byte_is_a_miss(data: st.DataObject) -> None:
    fmt = data.draw(st.sampled_from([SMALL, QUANTIZED["mixed"]]))
    value = bytearray(value_of(fmt))
    index = data.draw(st.integers(0, len(value) - 1))
    value[index] ^= data.draw(st.integers(1, 255))
    assert decode_block(bytes(value), fmt, tokens(fmt)) is None


@settings(max_examples=100, deadline=None)
@given(length=st.integers(0, HEADER.size + SMALL.bytes_per_block - 1))
def test_truncated_value_is_a_miss(length: int) -> None:
    assert decode_block(value_of(SMALL)[:length], SMALL, tokens(SMALL)) is None


@settings(max_examples=100, deadline=None)
@given(garbage=st.binary(max_size=HEADER.size + SMALL.bytes_per_block + 8))
def test_garbage_is_a_miss(garbage: bytes) -> None:
    assert decode_block(garbage, SMALL, tokens(SMALL)) is None
    padded = garbage.ljust(HEADER.size + SMALL.bytes_per_block, b"\0")[: HEADER.size + SMALL.bytes_per_block]
    assert decode_block(padded, SMALL, tokens(SMALL)) is None


def test_padded_value_is_a_miss() -> None:
    assert decode_block(value_of(SMALL) + b"\0", SMALL, tokens(SMALL)) is None


@pytest.mark.parametrize(("field", "replacement"), [("magic", b"KVCX"), ("version", VERSION + 1), ("version", 0)])
def test_wrong_magic_or_version_is_a_miss(field: str, replacement: object) -> None:
    magic, version, *rest = HEADER.unpack_from(value_of(SMALL))
    fields = {"magic": magic, "version": version, **{field: replacement}}
    value = HEADER.pack(fields["magic"], fields["version"], *rest) + value_of(SMALL)[HEADER.size :]
    assert decode_block(value, SMALL, tokens(SMALL)) is None  # the payload checksum alone would still pass


OTHER_FORMATS = {
    "dtype": dataclasses.replace(SMALL, dtype=torch.float16),  # same byte length
    "heads_and_dim": dataclasses.replace(SMALL, kv_heads=4, head_dim=4),  # same byte length
    "block_size": dataclasses.replace(SMALL, block_size=8),
    "num_layers": dataclasses.replace(SMALL, num_layers=3),
    "group_size": dataclasses.replace(SMALL, group_size=32),
    "layer_bits_order": dataclasses.replace(QUANTIZED["mixed"], layer_bits=(2, 4, 8)),  # same byte length
    "quantized": dataclasses.replace(SMALL, layer_bits=(8, 8), group_size=8),
}


@pytest.mark.parametrize("field", OTHER_FORMATS)
def test_a_value_of_another_format_is_a_miss(field: str) -> None:
    other = OTHER_FORMATS[field]
    source = QUANTIZED["mixed"] if field == "layer_bits_order" else SMALL
    assert format_fingerprint(other) != format_fingerprint(source)
    assert decode_block(value_of(source), other, tokens(other)) is None


def test_other_token_ids_are_a_miss() -> None:
    value = value_of(SMALL)
    assert decode_block(value, SMALL, tokens(SMALL)) is not None
    assert decode_block(value, SMALL, [*tokens(SMALL)[:-1], 99]) is None
    assert decode_block(value, SMALL, tokens(SMALL)[::-1]) is None
    assert decode_block(value, SMALL, tokens(SMALL)[:-1]) is None
    assert decode_block(value, SMALL, [2**63, 0, 0, 0]) is None  # not an int64: a miss, not an exception


def test_token_digest_is_order_and_length_sensitive() -> None:
    assert token_digest([1, 2]) != token_digest([2, 1])
    assert token_digest([1, 2]) != token_digest([1, 2, 0])
    assert token_digest([1, 2]) == token_digest(torch.tensor([1, 2]).tolist())
    assert len(token_digest([])) == 16


def test_encode_rejects_tensors_that_do_not_match_the_format() -> None:
    good = export_block(filled_pool(SMALL, 1, seed=0), 0)
    with pytest.raises(CacheValidationError, match="got 3 tensors"):
        encode_block(SMALL, good[:3], tokens(SMALL))
    with pytest.raises(CacheValidationError, match=r"tensors\[1\] \(layer 0 values\)"):
        encode_block(SMALL, [good[0], good[1][None], *good[2:]], tokens(SMALL))
    with pytest.raises(CacheValidationError, match=r"tensors\[2\].*torch.float32"):
        encode_block(SMALL, [*good[:2], good[2].float(), good[3]], tokens(SMALL))
    with pytest.raises(CacheValidationError, match="block_size=4"):
        encode_block(SMALL, good, tokens(SMALL)[:3])
    with pytest.raises(CacheValidationError, match="int64"):
        encode_block(SMALL, good, [2**63, 0, 0, 0])


def test_header_layout_is_the_documented_one() -> None:
    value = value_of(SMALL)
    magic, version, fingerprint, length, digest, _ = HEADER.unpack_from(value)
    assert HEADER.size == 50 and (magic, version) == (b"KVCB", 1)
    assert fingerprint == format_fingerprint(SMALL) and digest == token_digest(tokens(SMALL))
    assert length == SMALL.bytes_per_block == struct.unpack_from("<Q", value, 22)[0]
