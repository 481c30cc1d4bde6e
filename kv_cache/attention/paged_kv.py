"""`PagedKV`: one layer's paged keys and values for one batch, as attention reads them, and its validation.

A sequence is its quantized blocks (the oldest tokens, a whole number of blocks) followed by a full-precision tail
(the newest tokens) in blocks of a separate pool. Attention sees the concatenation, in that order:

    cache index:  0 ............................ q_len-1 | q_len ............... q_len+tail-1
    stored in:    quantized blocks (QuantizedKV)          | full-precision blocks (PagedKV's own fields)

where `q_len = quantized.seq_lens[b]` and `tail = seq_lens[b]`. Token t of a part lives in block
`block_table[b, t // block_size]` at offset `t % block_size` of that part's pool.

Layouts (one layer; vLLM's "NHD" block layout, the pool's `keys[layer]`):

    full precision   key_cache, value_cache  [num_blocks, block_size, kv_heads, head_dim]  fp32/fp16/bf16
                     block_table [batch, max_blocks] int32 (int64 accepted), seq_lens [batch] int32 (tokens)
    quantized        key_codes, value_codes  [num_qblocks, qblock_size, kv_heads, packed_dim]  uint8
                     key_scale, key_zero     [num_qblocks, kv_heads, head_dim]  fp16 (per channel over the block)
                     value_scale, value_zero [num_qblocks, qblock_size, kv_heads, head_dim // group_size]  fp16
                     block_table [batch, max_qblocks], seq_lens [batch] (multiples of qblock_size)

Codes are packed split-half and dequantize as `code * scale + zero` (see `kv_cache.quantizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import torch

from kv_cache.errors import CacheValidationError
from kv_cache.quantizer import bits_of

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

AttentionOutput: TypeAlias = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""`output`, or `(output, attention_mass)` when `return_attention_mass=True`."""


@dataclass(frozen=True)
class QuantizedKV:
    """The quantized (oldest) part of one layer's paged K/V; shapes and dtypes in the module docstring.

    The bit width, value group size and block size follow from the shapes (`bits`, `group_size`, `block_size`).
    """

    key_codes: torch.Tensor
    key_scale: torch.Tensor
    key_zero: torch.Tensor
    value_codes: torch.Tensor
    value_scale: torch.Tensor
    value_zero: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor

    @property
    def head_dim(self) -> int:
        return int(self.key_scale.shape[-1])

    @property
    def bits(self) -> int:
        return bits_of(self.key_codes, self.head_dim)

    @property
    def group_size(self) -> int:
        """Channels sharing one value scale/zero."""
        return self.head_dim // int(self.value_scale.shape[-1])

    @property
    def block_size(self) -> int:
        return int(self.key_codes.shape[1])


@dataclass(frozen=True)
class PagedKV:
    """One layer's paged K/V for one batch: the full-precision blocks, and optionally quantized older blocks.

    Shapes and dtypes are in the module docstring; `seq_lens` counts the full-precision (tail) tokens only when
    `quantized` is given.
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    quantized: QuantizedKV | None = None

    @property
    def batch(self) -> int:
        return int(self.block_table.shape[0])

    @property
    def kv_heads(self) -> int:
        return int(self.key_cache.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self.key_cache.shape[3])

    @property
    def block_size(self) -> int:
        return int(self.key_cache.shape[1])

    def total_lens(self) -> torch.Tensor:
        """`[batch]` int64: tokens per sequence, quantized and tail together."""
        total = self.seq_lens.long()
        return total if self.quantized is None else total + self.quantized.seq_lens.long()


@dataclass(frozen=True)
class AttentionOptions:
    """What `decode`/`prefill` compute besides plain causal attention (validated on construction).

    scale: softmax scale; None means `head_dim ** -0.5`.
    sliding_window: each query sees only the last `sliding_window` cache indices up to its own (itself included).
    sink_tokens: the first `sink_tokens` cache indices stay visible whatever the window.
    return_attention_mass: also return each cached token's softmax weight.
    """

    scale: float | None = None
    sliding_window: int | None = None
    sink_tokens: int = 0
    return_attention_mass: bool = False

    def __post_init__(self) -> None:
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise CacheValidationError(f"scale={self.scale!r} must be a positive number or None")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise CacheValidationError(f"sliding_window={window!r} must be a positive number of tokens or None")
        sinks = self.sink_tokens
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise CacheValidationError(f"sink_tokens={sinks!r} must be a non-negative number of tokens")

    def softmax_scale(self, head_dim: int) -> float:
        return float(self.scale) if self.scale is not None else head_dim**-0.5


def validate(query: torch.Tensor, kv: PagedKV, query_dims: int) -> None:
    """Raise CacheValidationError unless `query` and `kv` fit together (shapes, dtypes, devices; no data read).

    query: `[batch, q_heads, head_dim]` (query_dims=3, decode) or `[batch, q_heads, q_len, head_dim]` (4, prefill).
    """
    if not isinstance(query, torch.Tensor) or query.dim() != query_dims or query.dtype not in FLOAT_DTYPES:
        layout = "[batch, q_heads, head_dim]" if query_dims == 3 else "[batch, q_heads, q_len, head_dim]"
        got = f"{query.dtype} {list(query.shape)}" if isinstance(query, torch.Tensor) else type(query).__name__
        raise CacheValidationError(f"query must be a fp32/fp16/bf16 tensor {layout}; got {got}")
    if not isinstance(kv, PagedKV):
        raise CacheValidationError(f"kv must be a PagedKV; got {type(kv).__name__}")
    _check_fp_part(kv)
    batch, q_heads, head_dim = query.shape[0], query.shape[1], query.shape[-1]
    if batch != kv.batch or head_dim != kv.head_dim:
        raise CacheValidationError(
            f"query has batch {batch} and head_dim {head_dim}; the cache has batch {kv.batch} (block_table rows) "
            f"and head_dim {kv.head_dim}"
        )
    if q_heads % kv.kv_heads:
        raise CacheValidationError(
            f"query has {q_heads} heads, not a multiple of the cache's {kv.kv_heads} KV heads (grouped-query "
            "attention needs q_heads = kv_heads x group)"
        )
    if query.device != kv.key_cache.device:
        raise CacheValidationError(f"query is on {query.device} but the cache is on {kv.key_cache.device}")
    if kv.quantized is not None:
        _check_quantized_part(kv.quantized, kv)


def _check_fp_part(kv: PagedKV) -> None:
    key, value = kv.key_cache, kv.value_cache
    if key.dim() != 4 or key.dtype not in FLOAT_DTYPES:
        raise CacheValidationError(
            f"key_cache must be fp32/fp16/bf16 [num_blocks, block_size, kv_heads, head_dim]; got {key.dtype} "
            f"{list(key.shape)}"
        )
    if value.shape != key.shape or value.dtype != key.dtype or value.device != key.device:
        raise CacheValidationError(
            f"value_cache ({value.dtype} {list(value.shape)} on {value.device}) must match key_cache "
            f"({key.dtype} {list(key.shape)} on {key.device})"
        )
    _check_table("block_table", "seq_lens", kv.block_table, kv.seq_lens, key.device)


def _check_table(
    table_name: str, lens_name: str, table: torch.Tensor, lens: torch.Tensor, device: torch.device
) -> None:
    if table.dim() != 2 or table.dtype not in INDEX_DTYPES:
        raise CacheValidationError(
            f"{table_name} must be int32 [batch, max_blocks]; got {table.dtype} {list(table.shape)}"
        )
    if lens.dim() != 1 or lens.dtype not in INDEX_DTYPES or lens.shape[0] != table.shape[0]:
        raise CacheValidationError(
            f"{lens_name} must be int32 [batch={table.shape[0]}]; got {lens.dtype} {list(lens.shape)}"
        )
    if table.device != device or lens.device != device:
        raise CacheValidationError(f"{table_name}/{lens_name} are on {table.device}/{lens.device}, not {device}")


def _check_quantized_part(part: QuantizedKV, kv: PagedKV) -> None:
    if not isinstance(part, QuantizedKV):
        raise CacheValidationError(f"kv.quantized must be a QuantizedKV or None; got {type(part).__name__}")
    head_dim, kv_heads, device = kv.head_dim, kv.kv_heads, kv.key_cache.device
    if part.key_scale.dim() != 3 or part.key_scale.shape[1:] != (kv_heads, head_dim):
        raise CacheValidationError(
            f"key_scale must be fp16 [num_qblocks, kv_heads={kv_heads}, head_dim={head_dim}]; got "
            f"{list(part.key_scale.shape)}"
        )
    codes = part.key_codes
    bits = bits_of(codes, head_dim) if codes.dim() == 4 else 0
    if bits == 0 or codes.shape[2] != kv_heads or part.value_codes.shape != codes.shape:
        raise CacheValidationError(
            f"key_codes and value_codes must be uint8 [num_qblocks, qblock_size, kv_heads={kv_heads}, packed_dim]; "
            f"got {list(codes.shape)} and {list(part.value_codes.shape)}"
        )
    num_blocks, block_size = codes.shape[0], codes.shape[1]
    groups = part.value_scale.shape[-1] if part.value_scale.dim() == 4 else 0
    expected = {
        "key_scale": (num_blocks, kv_heads, head_dim),
        "key_zero": (num_blocks, kv_heads, head_dim),
        "value_scale": (num_blocks, block_size, kv_heads, groups),
        "value_zero": (num_blocks, block_size, kv_heads, groups),
    }
    for name, shape in expected.items():
        stats = getattr(part, name)
        if stats.dtype != torch.float16 or tuple(stats.shape) != shape or groups == 0 or head_dim % groups:
            raise CacheValidationError(
                f"{name} must be fp16 {list(shape)} (value groups must divide head_dim={head_dim}); got "
                f"{stats.dtype} {list(stats.shape)}"
            )
    tensors = (codes, part.value_codes, *(getattr(part, name) for name in expected))
    if any(t.device != device for t in tensors):
        raise CacheValidationError(f"the quantized part must live on the cache's device {device}")
    _check_table("quantized.block_table", "quantized.seq_lens", part.block_table, part.seq_lens, device)
    if part.block_table.shape[0] != kv.batch:
        raise CacheValidationError(
            f"quantized.block_table has {part.block_table.shape[0]} rows but the batch is {kv.batch}"
        )


def check_lengths(kv: PagedKV, q_len: int) -> torch.Tensor:
    """Raise CacheValidationError unless every length fits its block table and holds the `q_len` queries.

    A row with no tokens at all is an idle batch slot: it is allowed and attends to nothing.
    Reads the lengths on the host (a device sync), so only the reference calls it. Returns `kv.total_lens()`.
    """
    parts = [("seq_lens", kv.seq_lens, kv.block_table, kv.block_size)]
    if kv.quantized is not None:
        part = kv.quantized
        parts.append(("quantized.seq_lens", part.seq_lens, part.block_table, part.block_size))
        if bool((part.seq_lens % part.block_size != 0).any()):
            raise CacheValidationError(
                f"quantized.seq_lens={part.seq_lens.tolist()} must be multiples of the quantized block size "
                f"{part.block_size} (only whole blocks are quantized; the rest is the tail)"
            )
    for name, lens, table, block_size in parts:
        capacity = table.shape[1] * block_size
        if bool((lens < 0).any()) or bool((lens > capacity).any()):
            raise CacheValidationError(
                f"{name}={lens.tolist()} must lie in [0, {capacity}] ({table.shape[1]} blocks of {block_size})"
            )
    total = kv.total_lens()
    if bool(((total < q_len) & (total > 0)).any()):
        raise CacheValidationError(
            f"sequences hold {total.tolist()} tokens but q_len={q_len}: the new tokens must already be in the cache"
        )
    return total
