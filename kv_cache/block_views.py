"""Block tables as tensors: what attention kernels and gathers read, built from `BlockTable`s.

    block rows  [batch, blocks] int64 ids of a range of logical blocks (`block_rows`)
    view rows   the same tables as host lists (`view_rows`), for a caller that fills buffers of its own
    paged view  `PagedKV`: one layer's storage tensors with int32 block tables and lengths, rows of any length
                (padded with block 0 past each row's end), full-precision tail and sealed part separately

Building them costs a host-to-device copy, so the store keeps them in a `VersionedCache` until a table changes.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from kv_cache.attention.paged_kv import PagedKV, QuantizedKV
from kv_cache.block_pool import BlockPool
from kv_cache.block_table import BlockTable, blocks_needed
from kv_cache.devices import device_tensor

V = TypeVar("V")
CACHE_ENTRIES = 64


class VersionedCache(Generic[V]):
    """A small memo whose entries are valid only for the version they were stored at."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[int, V]] = {}

    def get(self, key: Hashable, version: int) -> V | None:
        entry = self._entries.get(key)
        return entry[1] if entry is not None and entry[0] == version else None

    def put(self, key: Hashable, version: int, value: V) -> V:
        if len(self._entries) >= CACHE_ENTRIES:
            self._entries.clear()
        self._entries[key] = (version, value)
        return value


def block_rows(tables: list[BlockTable], first: int, count: int, quantized: bool) -> list[list[int]]:
    """Ids of logical blocks `[first, first + count)` per table (sealed blocks when `quantized`)."""
    if quantized:
        return [t.quantized_ids[first : first + count] for t in tables]
    return [[t.dense_blocks[logical] for logical in range(first, first + count)] for t in tables]


def consecutive_run(rows: list[list[int]]) -> int | None:
    """The first id when `rows` is one row of consecutive ascending ids (a zero-copy slice), else None."""
    if len(rows) != 1 or not rows[0]:
        return None
    row = rows[0]
    return row[0] if row == list(range(row[0], row[0] + len(row))) else None


@dataclass(frozen=True)
class ViewRows:
    """One layer of a batch as host lists: what `paged_view` copies to the device.

    dense_rows: per table, the full-precision block ids after its sealed blocks (None when not asked for); tail_lens:
    the tokens in them; sealed_rows / sealed_lens: the quantized block ids (None when not asked for) and their
    tokens (both None without a quantized pool).
    """

    dense_rows: list[list[int]] | None
    tail_lens: list[int]
    sealed_rows: list[list[int]] | None
    sealed_lens: list[int] | None


def view_rows(tables: list[BlockTable], layer: int, block_size: int, quantized: bool, blocks: bool = True) -> ViewRows:
    """`layer` of the tables as block-id rows and lengths (see `attention.paged_kv` for the layout); `blocks=False`
    leaves the block-id rows out (a caller whose copy of them is current needs only the lengths)."""
    sealed = [t.layer_sealed[layer] // block_size for t in tables]
    dense_rows = None
    if blocks:
        dense_rows = [
            [t.dense_blocks[x] for x in range(s, blocks_needed(t.layer_lengths[layer], block_size))]
            for t, s in zip(tables, sealed, strict=True)
        ]
    tail = [t.layer_lengths[layer] - t.layer_sealed[layer] for t in tables]
    if not quantized:
        return ViewRows(dense_rows, tail, None, None)
    sealed_rows = [t.quantized_ids[:s] for t, s in zip(tables, sealed, strict=True)] if blocks else None
    return ViewRows(dense_rows, tail, sealed_rows, [s * block_size for s in sealed])


def paged_view(tables: list[BlockTable], layer: int, pool: BlockPool, quantized_pool: BlockPool | None) -> PagedKV:
    """`layer` of the tables as `kv_cache.attention` reads it (see `attention.paged_kv` for the layout)."""
    device = pool.device
    rows = view_rows(tables, layer, pool.block_size, quantized_pool is not None)
    assert rows.dense_rows is not None
    quantized = None
    if quantized_pool is not None and rows.sealed_rows is not None and rows.sealed_lens is not None:
        storage = quantized_pool.quantized(layer)
        quantized = QuantizedKV(
            storage.key_codes, storage.key_scale, storage.key_zero,
            storage.value_codes, storage.value_scale, storage.value_zero,
            _int32_table(rows.sealed_rows, device), _int32_row(rows.sealed_lens, device),
        )  # fmt: skip
    dense = pool.dense(layer)
    table = _int32_table(rows.dense_rows, device)
    return PagedKV(dense.keys, dense.values, table, _int32_row(rows.tail_lens, device), quantized)


def _int32_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """`[batch, max(len(row), 1)]` int32, rows padded with block 0."""
    width = max(1, *(len(row) for row in rows))
    return device_tensor([row + [0] * (width - len(row)) for row in rows], torch.int32, device)


def _int32_row(values: list[int], device: torch.device) -> torch.Tensor:
    return device_tensor(values, torch.int32, device)
