"""Reference attention over paged K/V: gather, dequantize, softmax attention in fp32. Pure torch, any device.

The definition the Triton kernels are tested against, so it favours plain code over speed: it gathers each
sequence's blocks into a dense `[batch, kv_heads, seq_len, head_dim]` fp32 copy (quantized blocks dequantized with
their stored fp16 scale and zero by `kv_cache.quantizer`), masks, and applies softmax attention with the query
heads of one KV head grouped (no repeated KV heads). It never mutates its inputs. Layouts are in `paged_kv`.

Masking, in cache indices: query i of a batch row of `seq_len` tokens sits at `pos = seq_len - q_len + i` and sees
index j when `j <= pos` and, with a sliding window, `j < sink_tokens or j > pos - sliding_window`. A query that
sees nothing returns zeros (and zero mass).
"""

from __future__ import annotations

import torch

from kv_cache.attention.paged_kv import (
    AttentionOptions,
    AttentionOutput,
    PagedKV,
    QuantizedKV,
    check_lengths,
    validate,
)
from kv_cache.errors import CacheValidationError
from kv_cache.quantizer import dequantize_keys, dequantize_values


def decode(
    query: torch.Tensor,
    kv: PagedKV,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    sink_tokens: int = 0,
    return_attention_mass: bool = False,
) -> AttentionOutput:
    """Attention of one new query token per sequence over its paged cache.

    query: `[batch, q_heads, head_dim]` fp32/fp16/bf16; q_heads a multiple of `kv.kv_heads`.
    Returns the output `[batch, q_heads, head_dim]` in the query dtype, and with `return_attention_mass` also the
    softmax weights `[batch, q_heads, seq_len]` fp32 (seq_len = the longest sequence; shorter rows padded with 0).
    """
    validate(query, kv, query_dims=3)
    options = AttentionOptions(scale, sliding_window, sink_tokens, return_attention_mass)
    output, mass = attend(query.unsqueeze(2), kv, options)
    return (output.squeeze(2), mass) if mass is not None else output.squeeze(2)


def prefill(
    query: torch.Tensor,
    kv: PagedKV,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    sink_tokens: int = 0,
    return_attention_mass: bool = False,
) -> AttentionOutput:
    """Causal attention of the last `q_len` tokens of each sequence (already in the cache) over the cache.

    query: `[batch, q_heads, q_len, head_dim]` fp32/fp16/bf16. Returns `[batch, q_heads, q_len, head_dim]` in the
    query dtype, and with `return_attention_mass` the weights averaged over the q_len queries,
    `[batch, q_heads, seq_len]` fp32 (each row sums to 1).
    """
    validate(query, kv, query_dims=4)
    options = AttentionOptions(scale, sliding_window, sink_tokens, return_attention_mass)
    output, mass = attend(query, kv, options)
    return (output, mass) if mass is not None else output


def attend(query: torch.Tensor, kv: PagedKV, options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The shared body: query `[batch, q_heads, q_len, head_dim]` -> (output like query, mass or None)."""
    batch, q_heads, q_len, head_dim = query.shape
    lengths = check_lengths(kv, q_len)
    keys, values = dense_kv(kv, lengths)
    group = q_heads // kv.kv_heads
    q = query.float().reshape(batch, kv.kv_heads, group, q_len, head_dim)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q, keys) * options.softmax_scale(head_dim)
    visible = visible_mask(lengths, q_len, keys.shape[2], options)[:, None, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row that sees nothing would be softmax(-inf, ...) = NaN; it attends to nothing instead.
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)
    output = torch.einsum("bhgqk,bhkd->bhgqd", probs, values).reshape(query.shape).to(query.dtype)
    mass = probs.mean(dim=3).reshape(batch, q_heads, -1) if options.return_attention_mass else None
    return output, mass


def visible_mask(lengths: torch.Tensor, q_len: int, seq_len: int, options: AttentionOptions) -> torch.Tensor:
    """`[batch, q_len, seq_len]` bool: whether query i of row b sees cache index j (rule in the module docstring).

    lengths: `[batch]` int64 tokens per sequence.
    """
    index = torch.arange(seq_len, device=lengths.device)
    pos = lengths[:, None] - q_len + torch.arange(q_len, device=lengths.device)  # [batch, q_len]
    visible = index <= pos[..., None]
    if options.sliding_window is not None:
        in_window = index > pos[..., None] - options.sliding_window
        visible &= in_window | (index < options.sink_tokens)
    return visible


def dense_kv(kv: PagedKV, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather (and dequantize) every sequence: keys, values `[batch, kv_heads, seq_len, head_dim]` fp32.

    lengths: `kv.total_lens()`; seq_len is its maximum, shorter rows are zero-padded.
    """
    seq_len = int(lengths.max()) if lengths.numel() else 0
    shape = (kv.batch, seq_len, kv.kv_heads, kv.head_dim)
    keys = kv.key_cache.new_zeros(shape, dtype=torch.float32)
    values = torch.zeros_like(keys)
    part = kv.quantized
    tail_lens = kv.seq_lens.tolist()
    quant_lens = part.seq_lens.tolist() if part is not None else [0] * kv.batch
    for row, (quant_len, tail_len) in enumerate(zip(quant_lens, tail_lens, strict=True)):
        if part is not None and quant_len:
            keys[row, :quant_len], values[row, :quant_len] = _gather_quantized(part, row, quant_len)
        end = quant_len + tail_len
        keys[row, quant_len:end] = _gather_blocks(kv.key_cache, kv.block_table[row], tail_len)
        values[row, quant_len:end] = _gather_blocks(kv.value_cache, kv.block_table[row], tail_len)
    return keys.transpose(1, 2), values.transpose(1, 2)


def _block_ids(table_row: torch.Tensor, num_tokens: int, block_size: int, num_blocks: int) -> torch.Tensor:
    """The first blocks of one block-table row that hold `num_tokens` tokens, checked against the pool size."""
    ids = table_row[: -(-num_tokens // block_size)].long()
    if ids.numel() and bool(((ids < 0) | (ids >= num_blocks)).any()):
        raise CacheValidationError(f"block table row {ids.tolist()} names blocks outside [0, {num_blocks})")
    return ids


def _gather_blocks(cache: torch.Tensor, table_row: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`[num_tokens, kv_heads, head_dim]` fp32 from a `[num_blocks, block_size, kv_heads, head_dim]` cache."""
    ids = _block_ids(table_row, num_tokens, cache.shape[1], cache.shape[0])
    return cache[ids].flatten(0, 1)[:num_tokens].float()


def _gather_quantized(part: QuantizedKV, row: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized keys and values of row `row`'s quantized blocks: two `[num_tokens, kv_heads, head_dim]` fp32."""
    ids = _block_ids(part.block_table[row], num_tokens, part.block_size, part.key_codes.shape[0])
    keys = dequantize_keys(part.key_codes[ids], part.key_scale[ids], part.key_zero[ids], part.head_dim)
    values = dequantize_values(part.value_codes[ids], part.value_scale[ids], part.value_zero[ids], part.head_dim)
    return keys.flatten(0, 1), values.flatten(0, 1)
