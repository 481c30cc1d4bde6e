"""One block (all layers) as a compact binary value, and back: what the CPU and Redis tiers store.

A value is a fixed 50-byte header, then every tensor's raw bytes, back to back, in the pool's order:

    offset  bytes  field
         0      4  magic b"KVCB"
         4      2  format version (uint16, little-endian)
         6     16  format fingerprint: BLAKE2b-128 of every `BlockFormat` field, the version and the byte order
        22      8  payload length in bytes (uint64)
        30     16  token digest: BLAKE2b-128 of the block's token ids as little-endian int64
        46      4  CRC-32 of the payload (uint32)
        50      -  payload: for each layer, `layer.tensors()` at one block id, C-contiguous
                   dense      keys, values                      [block_size, kv_heads, head_dim]  dtype
                   quantized  key_codes [block_size, kv_heads, packed_dim] uint8, key_scale, key_zero
                              [kv_heads, head_dim] fp16, value_codes, value_scale, value_zero (value stats
                              [block_size, kv_heads, head_dim // group] fp16)

Bytes are the host's (little-endian on every platform torch ships for); the byte order is part of the
fingerprint, so a big-endian reader misses instead of misreading. bf16 travels as its raw 16-bit patterns.

Why CRC-32 and not BLAKE2b for the payload: the checksum guards against accidental damage (truncation, flipped
bits, a stale or half-written value) and catches every error burst of up to 32 bits; it costs 0.27 ms per MiB
here against 1.4 ms for BLAKE2b, while a Redis GET of 1 MiB takes ~0.42 ms. A cryptographic digest would add
no protection against a writer with access to Redis (it could recompute any unkeyed digest); identity is
guarded by the key (a BLAKE2b/SHA-256 chain hash) and the token digest here (A3/A4 in RELIABILITY.md).

Never pickle: decoding reads only the fixed header and raw bytes, so a value cannot run code.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from kv_cache.block_format import BlockFormat, DenseBlocks
from kv_cache.errors import CacheValidationError

MAGIC = b"KVCB"
VERSION = 1
HEADER = struct.Struct("<4sH16sQ16sI")  # magic, version, fingerprint, payload bytes, token digest, CRC-32
_DENSE_NAMES = ("keys", "values")
_QUANTIZED_NAMES = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a block: which layer, its name in `LayerBlocks`, its per-block shape and dtype."""

    layer: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


@lru_cache(maxsize=64)
def block_layout(block_format: BlockFormat) -> tuple[TensorSpec, ...]:
    """The tensors of one block in the pool's order (`layer.tensors()` of each layer), without the block axis."""
    specs = []
    for layer, blocks in enumerate(block_format.allocate(1, torch.device("meta"))[0]):
        names = _DENSE_NAMES if isinstance(blocks, DenseBlocks) else _QUANTIZED_NAMES
        for name, tensor in zip(names, blocks.tensors(), strict=True):
            specs.append(TensorSpec(layer, name, tuple(tensor.shape[1:]), tensor.dtype))
    return tuple(specs)


@lru_cache(maxsize=64)
def format_fingerprint(block_format: BlockFormat) -> bytes:
    """BLAKE2b-128 (16 bytes) of every field of `block_format`, the codec version and the host byte order."""
    fmt = block_format
    bits = "none" if fmt.layer_bits is None else ",".join(str(b) for b in fmt.layer_bits)
    text = (
        f"kv_cache block v{VERSION} {sys.byteorder} block_size={fmt.block_size} num_layers={fmt.num_layers} "
        f"kv_heads={fmt.kv_heads} head_dim={fmt.head_dim} dtype={str(fmt.dtype).removeprefix('torch.')} "
        f"layer_bits={bits} group_size={fmt.group_size}"
    )
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def token_digest(token_ids: Sequence[int]) -> bytes:
    """BLAKE2b-128 (16 bytes) of `token_ids` as little-endian int64. Raises `CacheValidationError` if not int64."""
    try:
        packed = struct.pack(f"<{len(token_ids)}q", *token_ids)
    except (struct.error, TypeError) as exc:
        raise CacheValidationError(f"token_ids must be integers in the int64 range ({exc})") from exc
    return hashlib.blake2b(packed, digest_size=16).digest()


def encode_block(block_format: BlockFormat, tensors: Sequence[torch.Tensor], token_ids: Sequence[int]) -> bytes:
    """Serialise one block: header + raw bytes of `tensors` (any device; copied to the CPU).

    tensors: the block's tensors in `block_layout` order, each with its per-block shape and storage dtype
    (e.g. dense `[block_size, kv_heads, head_dim]` keys then values, per layer).
    token_ids: the `block_size` token ids the block holds. Returns `HEADER.size + bytes_per_block` bytes.
    Raises `CacheValidationError` naming the tensor or argument that does not match `block_format`.
    """
    layout = block_layout(block_format)
    if len(token_ids) != block_format.block_size:
        raise CacheValidationError(
            f"token_ids has {len(token_ids)} ids but a block holds block_size={block_format.block_size}; "
            "only full blocks are stored"
        )
    if len(tensors) != len(layout):
        raise CacheValidationError(
            f"got {len(tensors)} tensors but {block_format.describe()} has {len(layout)} per block "
            f"({len(layout) // block_format.num_layers} per layer, in layer.tensors() order)"
        )
    chunks = []
    checksum = 0
    for index, (spec, tensor) in enumerate(zip(layout, tensors, strict=True)):
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise CacheValidationError(
                f"tensors[{index}] (layer {spec.layer} {spec.name}) is {tuple(tensor.shape)} {tensor.dtype}; "
                f"expected {spec.shape} {spec.dtype}"
            )
        raw = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().data
        checksum = zlib.crc32(raw, checksum)
        chunks.append(raw)
    length = sum(spec.nbytes for spec in layout)
    header = HEADER.pack(MAGIC, VERSION, format_fingerprint(block_format), length, token_digest(token_ids), checksum)
    return b"".join([header, *chunks])


def decode_block(data: bytes, block_format: BlockFormat, token_ids: Sequence[int]) -> list[torch.Tensor] | None:
    """The block's tensors (CPU, `block_layout` order and shapes), or None when `data` is not exactly a block of
    `block_format` holding `token_ids`: wrong magic or version, another format, other tokens, wrong length
    (truncated or padded), or a payload that fails its CRC-32. Never raises for any `data`; never decodes part.
    """
    layout = block_layout(block_format)
    length = sum(spec.nbytes for spec in layout)
    if len(data) != HEADER.size + length:
        return None
    magic, version, fingerprint, stored_length, digest, checksum = HEADER.unpack_from(data)
    expected = (MAGIC, VERSION, format_fingerprint(block_format), length)
    if (magic, version, fingerprint, stored_length) != expected:
        return None
    try:
        if digest != token_digest(token_ids):
            return None
    except CacheValidationError:
        return None
    payload = memoryview(data)[HEADER.size :]
    if zlib.crc32(payload) != checksum:
        return None
    tensors = []
    offset = 0
    for spec in layout:
        # A private copy per tensor: aligned for its dtype, writable, and independent of `data`.
        raw = torch.frombuffer(bytearray(payload[offset : offset + spec.nbytes]), dtype=torch.uint8)
        tensors.append(raw.view(spec.dtype).view(spec.shape))
        offset += spec.nbytes
    return tensors
