"""Moving tokens between tensors and blocks: full-precision writes, and sealing blocks into quantized ones.

The functions take the storage of one layer (`DenseBlocks`, `QuantizedBlocks`) and the `BlockTable`s with their
`WritePlan`s, and do the index arithmetic (slot = block id * block_size + offset) in one place. New tokens
arrive as `[batch, kv_heads, tokens, head_dim]`; `token_rows` flattens them to rows `batch * tokens + t`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kv_cache.block_format import BlockFormat, DenseBlocks, QuantizedBlocks
from kv_cache.block_table import BlockTable, SealBatch, WritePlan
from kv_cache.errors import CacheValidationError

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TokenRows = tuple[torch.Tensor, torch.Tensor]
"""Keys and values as `[batch * tokens, kv_heads, head_dim]` rows (`token_rows`)."""


@dataclass(frozen=True)
class StateSpec:
    """What new keys/values must look like; None fields are not checked (nothing fixed them yet)."""

    batch: int | None
    block_format: BlockFormat | None
    dtype: torch.dtype | None
    device: torch.device | None
    finite: bool


def check_states(key: torch.Tensor, value: torch.Tensor, spec: StateSpec) -> None:
    """Raise `CacheValidationError` naming the problem unless `key`/`value` are `[batch, kv_heads, tokens,
    head_dim]` float tensors that match `spec` (shape, dtype, device, and finite values when asked)."""
    if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
        raise CacheValidationError(f"key and value must be tensors; got {type(key).__name__}, {type(value).__name__}")
    if key.layout != torch.strided or value.layout != torch.strided:
        raise CacheValidationError(
            f"key/value layouts are {key.layout}/{value.layout}; expected dense (strided) tensors"
        )
    if key.dim() != 4:
        raise CacheValidationError(
            f"key has shape {tuple(key.shape)}; expected 4 dims [batch, kv_heads, tokens, head_dim]"
        )
    if value.shape != key.shape:
        raise CacheValidationError(f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
    if spec.batch is not None and key.shape[0] != spec.batch:
        raise CacheValidationError(f"key has batch {key.shape[0]} but {spec.batch} sequence ids were given")
    if key.dtype not in _FLOAT_DTYPES or value.dtype != key.dtype:
        raise CacheValidationError(
            f"key/value dtypes are {key.dtype}/{value.dtype}; expected one of float32, float16, bfloat16, "
            "the same for both"
        )
    fmt = spec.block_format
    if fmt is not None and (key.shape[1] != fmt.kv_heads or key.shape[3] != fmt.head_dim):
        raise CacheValidationError(
            f"key has {key.shape[1]} KV heads x head_dim {key.shape[3]}; this cache holds "
            f"{fmt.kv_heads} KV heads x head_dim {fmt.head_dim}"
        )
    if spec.dtype is not None and key.dtype != spec.dtype:
        raise CacheValidationError(f"key dtype is {key.dtype}; this cache was filled with {spec.dtype}")
    if spec.device is not None and (key.device != spec.device or value.device != spec.device):
        raise CacheValidationError(f"key/value are on {key.device}/{value.device}; this cache lives on {spec.device}")
    if min(key.shape[1], key.shape[3]) == 0 or key.shape[0] == 0:
        raise CacheValidationError(f"key has shape {tuple(key.shape)}; batch, kv_heads and head_dim must be >= 1")
    if spec.finite and not bool(torch.isfinite(key).all() & torch.isfinite(value).all()):
        raise CacheValidationError(
            "key/value hold NaN or Inf; a quantized cache refuses them (they would poison a block's scales). "
            "Fix the model's numerics, or set check_finite=False to skip this check"
        )


def token_rows(states: torch.Tensor) -> torch.Tensor:
    """`[batch, kv_heads, tokens, head_dim]` -> `[batch * tokens, kv_heads, head_dim]`, row `b * tokens + t`."""
    batch, heads, tokens, dim = states.shape
    return states.transpose(1, 2).reshape(batch * tokens, heads, dim)


def write_dense(dense: DenseBlocks, tables: list[BlockTable], plans: list[WritePlan], rows: TokenRows) -> None:
    """Copy each table's tokens `[plan.dense_from, plan.end)` from `rows` into its full-precision blocks."""
    size = dense.keys.shape[1]
    table, plan = tables[0], plans[0]
    if len(tables) == 1 and plan.dense_from == plan.start and plan.start // size == (plan.end - 1) // size:
        # One run inside one block: one contiguous copy, no index tensors (the common decode step).
        slot = table.dense_blocks[plan.start // size] * size + plan.start % size
        dense.key_slots.narrow(0, slot, plan.end - plan.start).copy_(rows[0])
        dense.value_slots.narrow(0, slot, plan.end - plan.start).copy_(rows[1])
        return
    slots: list[int] = []
    sources: list[int] = []
    per_table = rows[0].shape[0] // len(tables)
    for index, (table, plan) in enumerate(zip(tables, plans, strict=True)):
        for position in range(plan.dense_from, plan.end):
            slots.append(table.dense_blocks[position // size] * size + position % size)
            sources.append(index * per_table + position - plan.start)
    if not slots:
        return
    keys, values = rows
    if len(sources) != keys.shape[0]:
        picked = torch.tensor(sources, device=keys.device)
        keys, values = keys.index_select(0, picked), values.index_select(0, picked)
    dense.write(torch.tensor(slots, device=keys.device), keys, values)


def encode_sealed(
    dense: DenseBlocks, storage: QuantizedBlocks, seal: SealBatch, rows: TokenRows | None
) -> tuple[torch.Tensor, ...]:
    """Quantize the blocks a seal's plans seal (tokens `[plan.sealed, plan.seal_to)`).

    Tokens before `plan.start` come from the table's full-precision blocks, later ones from the new `rows` (row
    `seal.rows[i]` of the append's batch; None when only stored tokens are sealed). New tokens are rounded to the
    full-precision storage dtype first, so a token is quantized from the same values whichever way it arrived.
    Returns what `QuantizedBlocks.store` takes; raises `CacheValidationError` on NaN/Inf before anything is written.
    """
    size = dense.keys.shape[1]
    from_blocks: tuple[list[int], list[int]] = ([], [])  # (slots of the blocks, rows of the sealed tokens)
    from_rows: tuple[list[int], list[int]] = ([], [])  # (rows of `rows`, rows of the sealed tokens)
    target = 0
    for index, (table, plan) in enumerate(zip(seal.tables, seal.plans, strict=True)):
        batch_row = seal.rows[index] if seal.rows is not None else 0
        for position in range(plan.sealed, plan.seal_to):
            if position < plan.start:
                from_blocks[0].append(table.dense_blocks[position // size] * size + position % size)
                from_blocks[1].append(target)
            else:
                from_rows[0].append(batch_row * (plan.end - plan.start) + position - plan.start)
                from_rows[1].append(target)
            target += 1
    device = dense.keys.device
    sealed = []
    new_rows = (None, None) if rows is None else rows
    for new, slots in zip(new_rows, (dense.key_slots, dense.value_slots), strict=True):
        tokens = torch.empty(target, *slots.shape[1:], device=device)
        for source, (src, dst) in ((slots, from_blocks), (new, from_rows)):
            if src and source is not None:
                picked = source.index_select(0, torch.tensor(src, device=device)).to(slots.dtype)
                tokens.index_copy_(0, torch.tensor(dst, device=device), picked.float())
        sealed.append(tokens.view(target // size, size, *slots.shape[1:]))
    return storage.encode(sealed[0], sealed[1])


def store_sealed(
    storage: QuantizedBlocks, tables: list[BlockTable], plans: list[WritePlan], encoded: tuple[torch.Tensor, ...]
) -> None:
    """Write `encode_sealed` output into each table's quantized blocks (already allocated)."""
    size = storage.key_codes.shape[1]
    block_ids = [
        table.quantized_ids[logical]
        for table, plan in zip(tables, plans, strict=True)
        for logical in range(plan.sealed // size, plan.seal_to // size)
    ]
    storage.store(torch.tensor(block_ids, device=storage.key_codes.device), encoded)
