"""Moving tokens between tensors and blocks: full-precision writes, and sealing blocks into quantized ones.

The functions take the storage of one layer (`DenseBlocks`, `QuantizedBlocks`) and the `BlockTable`s with their
`WritePlan`s, and do the index arithmetic (slot = block id * block_size + offset) in one place. New tokens
arrive as `[batch, kv_heads, tokens, head_dim]`; `token_rows` flattens them to rows `batch * tokens + t`.
"""

from __future__ import annotations

import torch

from kv_cache.block_format import DenseBlocks, QuantizedBlocks
from kv_cache.block_table import BlockTable, WritePlan

TokenRows = tuple[torch.Tensor, torch.Tensor]
"""Keys and values as `[batch * tokens, kv_heads, head_dim]` rows (`token_rows`)."""


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
    dense: DenseBlocks,
    storage: QuantizedBlocks,
    tables: list[BlockTable],
    plans: list[WritePlan],
    rows: TokenRows | None,
) -> tuple[torch.Tensor, ...]:
    """Quantize the blocks the plans seal (tokens `[plan.sealed, plan.seal_to)`).

    Tokens before `plan.start` come from the table's full-precision blocks, later ones from the new `rows`
    (None when only stored tokens are sealed). Returns what `QuantizedBlocks.store` takes; raises
    `CacheValidationError` on NaN/Inf before anything is written.
    """
    size = dense.keys.shape[1]
    from_blocks: tuple[list[int], list[int]] = ([], [])  # (slots of the blocks, rows of the sealed tokens)
    from_rows: tuple[list[int], list[int]] = ([], [])  # (rows of `rows`, rows of the sealed tokens)
    per_table = 0 if rows is None else rows[0].shape[0] // len(tables)
    target = 0
    for index, (table, plan) in enumerate(zip(tables, plans, strict=True)):
        for position in range(plan.sealed, plan.seal_to):
            if position < plan.start:
                from_blocks[0].append(table.dense_blocks[position // size] * size + position % size)
                from_blocks[1].append(target)
            else:
                from_rows[0].append(index * per_table + position - plan.start)
                from_rows[1].append(target)
            target += 1
    device = dense.keys.device
    sealed = []
    new_rows = (None, None) if rows is None else rows
    for new, slots in zip(new_rows, (dense.key_slots, dense.value_slots), strict=True):
        tokens = torch.empty(target, *slots.shape[1:], device=device)
        for source, (src, dst) in ((slots, from_blocks), (new, from_rows)):
            if src and source is not None:
                picked = source.index_select(0, torch.tensor(src, device=device))
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
