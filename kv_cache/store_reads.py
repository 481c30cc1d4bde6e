"""`StoreReads`: the read side of a `KVStore`, from block tables to what attention consumes.

Two forms, both for one layer of a batch of sequences (`ReadBatch`):

    paged_kv   block tables and lengths over the pools, no copy (`block_views.paged_view`), for the paged
               attention kernels; rows may hold different numbers of tokens
    read       dense keys and values `[batch, kv_heads, tokens, head_dim]` in the model's dtype, for Hugging Face
               attention; rows must hold the same number of tokens

`read` takes the cheapest of three paths: a *view of the pool* when one sequence's blocks are one run of
consecutive ids (nothing sealed, pool dtype = model dtype); else a *workspace*, two flat buffers reused by every
read (grown geometrically, so a steady-state read allocates nothing), viewed as `[batch, num_blocks, block_size,
kv_heads, head_dim]` and filled with the sealed blocks dequantized and the full-precision tail copied; in training
mode *fresh tensors* that carry the autograd graph. Block-table tensors and paged views are cached until the
store's version (bumped whenever a block id list changes) moves on.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kv_cache.attention.paged_kv import PagedKV, QuantizedKV
from kv_cache.block_pool import BlockPool
from kv_cache.block_table import BlockTable, blocks_needed
from kv_cache.block_views import VersionedCache, block_rows, consecutive_run, paged_view
from kv_cache.errors import CacheValidationError

Dense = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ReadBatch:
    """Sequences read together: their ids, their tables (same order) and the store's version now."""

    seq_ids: tuple[int, ...]
    tables: list[BlockTable]
    version: int

    def row(self, index: int) -> ReadBatch:
        return ReadBatch(self.seq_ids[index : index + 1], self.tables[index : index + 1], self.version)


class StoreReads:
    """Reads over `pool` (full precision) and `quantized_pool` (sealed blocks, or None) of one store.

    Args:
        pool, quantized_pool: the store's pools; model_dtype: the dtype `read` returns.
        training: return fresh tensors that keep the autograd graph (no workspace, no pool views).
    """

    def __init__(
        self, pool: BlockPool, quantized_pool: BlockPool | None, model_dtype: torch.dtype, training: bool
    ) -> None:
        self.pool = pool
        self.quantized_pool = quantized_pool
        self.model_dtype = model_dtype
        self.training = training
        self.block_size = pool.block_size
        self._block_tables: VersionedCache[tuple[torch.Tensor, int | None]] = VersionedCache()
        self._paged_views: VersionedCache[PagedKV] = VersionedCache()
        self._local = threading.local()  # each thread reads into its own workspace

    def block_rows(
        self, batch: ReadBatch, first: int, count: int, quantized: bool = False
    ) -> tuple[torch.Tensor, int | None]:
        """`[batch, count]` int64 ids of logical blocks `[first, first + count)` (sealed ones if `quantized`), and
        the first id when the batch is one row of consecutive ids (else None)."""
        key = (batch.seq_ids, first, count, quantized)
        cached = self._block_tables.get(key, batch.version)
        if cached is None:
            rows = block_rows(batch.tables, first, count, quantized)
            tensor = torch.tensor(rows, dtype=torch.long, device=self.pool.device)
            cached = self._block_tables.put(key, batch.version, (tensor, consecutive_run(rows)))
        return cached

    def paged_kv(self, batch: ReadBatch, layer: int) -> PagedKV:
        """`layer` of the batch as the attention kernels read it: block tables and lengths, no copy.

        The tables and lengths depend only on each row's (held, sealed) tokens in `layer`; layers in the same
        state (every layer of a decode step, without eviction) share one view's tensors, so the host builds and
        copies them once per step rather than once per layer.
        """
        state = (
            batch.seq_ids,
            tuple([t.layer_lengths[layer] for t in batch.tables]),
            tuple([t.layer_sealed[layer] for t in batch.tables]),
        )
        view = self._paged_views.get(state, batch.version)
        if view is None:
            view = paged_view(batch.tables, layer, self.pool, self.quantized_pool)
            self._paged_views.put(state, batch.version, view)
        return self._with_storage(view, layer)

    def _with_storage(self, view: PagedKV, layer: int) -> PagedKV:
        """`view`'s block tables and lengths over `layer`'s storage tensors."""
        dense = self.pool.dense(layer)
        if view.key_cache is dense.keys:
            return view
        quantized = view.quantized
        if quantized is not None and self.quantized_pool is not None:
            storage = self.quantized_pool.quantized(layer)
            quantized = QuantizedKV(
                storage.key_codes, storage.key_scale, storage.key_zero,
                storage.value_codes, storage.value_scale, storage.value_zero,
                quantized.block_table, quantized.seq_lens,
            )  # fmt: skip
        return PagedKV(dense.keys, dense.values, view.block_table, view.seq_lens, quantized)

    def read(self, batch: ReadBatch, layer: int) -> Dense:
        """Keys and values of `layer`, oldest first: two `[batch, kv_heads, tokens, head_dim]` model-dtype tensors,
        valid until the next read (views of the pool or of the workspace)."""
        lengths = {t.layer_lengths[layer] for t in batch.tables}
        if len(lengths) != 1:
            raise CacheValidationError(
                f"read needs sequences of equal length in layer {layer}; got lengths {sorted(lengths)}"
            )
        length = lengths.pop()
        if length == 0:
            raise CacheValidationError(f"layer {layer} of sequences {list(batch.seq_ids)} holds no tokens yet")
        dense = self.pool.dense(layer)
        num_blocks = blocks_needed(length, self.block_size)
        flat_shape = (len(batch.tables), num_blocks * self.block_size, *dense.keys.shape[-2:])
        if self.training:  # training configs are never quantized
            ids = self.block_rows(batch, 0, num_blocks)[0].flatten()
            keys, values = (t.index_select(0, ids).view(flat_shape) for t in (dense.keys, dense.values))
        else:
            keys, values = self._pool_view(batch, layer, num_blocks) or self._gathered(batch, layer, num_blocks)
            keys, values = keys.view(flat_shape), values.view(flat_shape)
        return keys[:, :length].transpose(1, 2), values[:, :length].transpose(1, 2)

    def _pool_view(self, batch: ReadBatch, layer: int, num_blocks: int) -> Dense | None:
        """The blocks as a view of the pool when they are one run of consecutive ids (no copy at all)."""
        dense = self.pool.dense(layer)
        if len(batch.tables) != 1 or batch.tables[0].layer_sealed[layer] or dense.keys.dtype != self.model_dtype:
            return None
        _, run = self.block_rows(batch, 0, num_blocks)
        if run is None:
            return None
        return dense.keys[run : run + num_blocks], dense.values[run : run + num_blocks]

    def _gathered(self, batch: ReadBatch, layer: int, num_blocks: int) -> Dense:
        """The blocks gathered into the workspace `[batch, num_blocks, block_size, kv_heads, head_dim]`."""
        dense = self.pool.dense(layer)
        shape = (len(batch.tables), num_blocks, self.block_size, *dense.keys.shape[-2:])
        out = tuple(buffer.view(shape) for buffer in self._workspace(math.prod(shape)))
        sealed = {t.layer_sealed[layer] // self.block_size for t in batch.tables}
        if len(sealed) == 1:
            self._gather(batch, layer, (sealed.pop(), num_blocks), (out[0], out[1]))
        else:  # rows sealed to different depths (after uneven truncation): one row at a time
            for row, table in enumerate(batch.tables):
                span = (table.layer_sealed[layer] // self.block_size, num_blocks)
                self._gather(batch.row(row), layer, span, (out[0][row : row + 1], out[1][row : row + 1]))
        return out[0], out[1]

    def _gather(self, batch: ReadBatch, layer: int, span: tuple[int, int], out: Dense) -> None:
        """Fill `out` (`[batch, num_blocks, block_size, kv_heads, head_dim]`, model dtype) with logical blocks
        `[0, num_blocks)`: the first `sealed` dequantized, the rest copied from the full-precision tail."""
        sealed, num_blocks = span
        rows = len(batch.tables)
        if sealed and self.quantized_pool is not None:
            ids = self.block_rows(batch, 0, sealed, quantized=True)[0].flatten()
            for target, blocks in zip(out, self.quantized_pool.quantized(layer).read(ids), strict=True):
                target[:, :sealed].copy_(blocks.view(rows, sealed, *blocks.shape[1:]))
        if num_blocks == sealed:
            return
        dense = self.pool.dense(layer)
        ids = self.block_rows(batch, sealed, num_blocks - sealed)[0].flatten()
        if sealed == 0 and dense.keys.dtype == out[0].dtype:  # gather straight into the workspace
            for target, storage in zip(out, (dense.keys, dense.values), strict=True):
                torch.index_select(storage, 0, ids, out=target.view(-1, *storage.shape[1:]))
            return
        for target, blocks in zip(out, dense.read(ids), strict=True):
            target[:, sealed:].copy_(blocks.view(rows, num_blocks - sealed, *blocks.shape[1:]))

    def _workspace(self, numel: int) -> Sequence[torch.Tensor]:
        """This thread's two flat buffers of at least `numel` elements, grown geometrically and then reused."""
        buffers: list[torch.Tensor] = getattr(self._local, "buffers", [])
        if not buffers or buffers[0].numel() < numel:
            capacity = max(numel, 2 * buffers[0].numel() if buffers else 0)
            buffers = [torch.empty(capacity, dtype=self.model_dtype, device=self.pool.device) for _ in range(2)]
            self._local.buffers = buffers
        return buffers[0][:numel], buffers[1][:numel]
