"""`KVStore`: the block tables of many sequences over preallocated block pools.

It is the one place that writes and reads a sequence's tokens: `append` finds (or allocates) the slots for new
tokens and copies them in (`blocks_needed_for_append` says beforehand what that allocates), `read`/`paged_kv`
give attention the blocks (`store_reads.StoreReads` does the gathering), `fork` shares every block with a new
sequence, `adopt_blocks` starts one on existing blocks (a prefix cache's, a swap's copies), and a write into a
shared block first copies it (copy-on-write). Token eviction compacts what a row keeps (`keep_tokens`) and
tracks attention per token (`attention_mass.AttentionMass`). Every public method takes the store's lock, so
threads may share one store.

With quantization there are two pools: `quantized_pool` holds sealed blocks (packed codes), `pool` the
full-precision tail of each sequence (its newest `residual_tokens` tokens or more); `sealing.Sealer` moves blocks
from one to the other as they age out of the window.

Inputs and outputs use Hugging Face's layout: `[batch, kv_heads, tokens, head_dim]`, one row per sequence id.

Every operation is atomic under a failing allocation: it completes, or it raises (`CacheMemoryError` for a device
out-of-memory error, see `_memory_errors`) with every table, block, reference count, free stack, attention mass and
the version as they were, and the same call works once memory allows. Each operation that writes runs in three
phases:

    1. compute   reads only: quantize what seals (`Sealer.encode`), dequantize a block a truncation unseals,
                 gather the tokens `keep_tokens` keeps, make room for attention mass (`AttentionMass.reserve`)
    2. assign    `_atomic`: tables and allocators change (blocks allocated, copied-on-write, sealed, released),
                 then the index tensors that name the new blocks are built; if anything raises, the tables, the
                 pools' journals (`BlockPool.atomic`) and the version are rolled back
    3. write     in place into the preallocated pools (`index_copy_`, `copy_`), nothing allocated, nothing to fail

Writing last is what makes the rollback exact: a block released and reallocated within one operation (a sealed
tail block reused by the same append) is only overwritten after everything read from it. The decode fast path
(`_in_place_runs`) needs no rollback: it builds its one index tensor before its only write, and changes lengths
after it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch

from kv_cache.attention.paged_kv import PagedKV
from kv_cache.attention_mass import AttentionMass, compact, kept_tokens, token_slots
from kv_cache.block_format import BlockFormat
from kv_cache.block_io import (
    StateSpec,
    TokenRows,
    check_states,
    dense_write,
    finite_flag,
    require_finite,
    token_rows,
    write_runs,
)
from kv_cache.block_pool import BlockPool
from kv_cache.block_table import BlockTable, SealBatch, WritePlan, blocks_needed, plan_append
from kv_cache.block_views import VersionedCache, ViewRows, view_rows
from kv_cache.config import CacheMode, CacheStrategy, KVCacheConfig
from kv_cache.devices import device_tensor
from kv_cache.errors import CacheMemoryError, CacheValidationError
from kv_cache.sealing import Sealer
from kv_cache.store_reads import ReadBatch, StoreReads

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class ReservedStep:
    """What `KVStore.reserve` made room for: the new tokens' `slots` (sequence by sequence, `count` each, the same
    in every layer), each sequence's first new `positions` (tokens seen before), the batch's lengths after the step
    and its tables unless still those of the caller's version (`rows`, every layer alike), and the store's
    `version` (it moves when a block list changes)."""

    slots: tuple[int, ...]
    positions: list[int]
    rows: ViewRows
    version: int


def _memory_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Turn an out-of-memory error inside a store operation into `CacheMemoryError` naming what to change."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except torch.OutOfMemoryError as error:
            raise CacheMemoryError(
                f"out of device memory during KVStore.{method.__name__}: the pools are preallocated, so this is "
                "the working memory around them; lower num_blocks, memory_budget_mb or max_tokens, or the batch"
            ) from error

    return wrapper


class KVStore:
    """Sequences of key/value tokens for `num_layers` layers, stored in blocks of preallocated pools.

    The pools are created by `initialize`, or lazily by the first `append` from the shapes it sees.
    """

    def __init__(self, config: KVCacheConfig, num_layers: int) -> None:
        if num_layers < 1:
            raise CacheValidationError(f"num_layers={num_layers} must be >= 1")
        self.config = config
        self.num_layers = num_layers
        self.block_size = config.tokens_per_block
        self.layer_bits = config.bits_per_layer(num_layers)
        self.pool: BlockPool | None = None
        self.quantized_pool: BlockPool | None = None
        self.sealer: Sealer | None = None
        self.model_dtype: torch.dtype | None = None
        self._tables: dict[int, BlockTable] = {}
        self._next_id = 0
        self._lock = threading.RLock()
        self._version = 0  # bumped whenever a block id list changes; keys the read side's caches
        self._reads: StoreReads | None = None  # made with the pools
        self._mass: AttentionMass | None = None  # for token eviction by LFU/ADAPTIVE
        self._unsealed_finite: dict[int, torch.Tensor] = {}  # NaN/Inf flags of `append(seal=False)`, for `seal`
        self._slot_tensors: VersionedCache[torch.Tensor] = VersionedCache()  # slot ids -> their device tensor
        self._runs: VersionedCache[tuple[tuple[int, int], ...]] = VersionedCache()  # `_in_place_runs`, per step

    # ----------------------------------------------------------------------------------------------- setup
    def initialize(
        self,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        batch_size: int,
        spare_tokens: int = 0,
    ) -> None:
        """Allocate the pools for tokens of `kv_heads` x `head_dim` from a model computing in `dtype`.

        Without `num_blocks` or `memory_budget_mb` in the config, the pools hold `batch_size` sequences of
        `max_tokens` tokens, plus one spare block per sequence for copy-on-write. With quantization the
        full-precision tail pool holds `batch_size` windows of `residual_tokens` plus three blocks (the block
        being filled, the one being sealed, and one spare), plus `spare_tokens` (room for a chunk written in full
        precision and sealed after the step: `reserve(..., seal_after=True)`), and the rest of a memory budget goes
        to sealed blocks.
        """
        with self._lock:
            if self.pool is not None:
                return
            config = self.config
            dense = BlockFormat(self.block_size, self.num_layers, kv_heads, head_dim, config.dtype or dtype)
            quantized_pool = None
            if self.layer_bits is None:
                num_blocks, hint = self._pool_size(dense, batch_size * (config.blocks_per_sequence + 1), 0)
                pool = BlockPool(dense, num_blocks, device, capacity_hint=hint)
            else:
                tail_blocks = batch_size * (config.residual_tokens // self.block_size + 3)
                tail_blocks += blocks_needed(spare_tokens, self.block_size)
                tail_hint = "the batch size of the first call (the tail pool is sized from it) or residual_tokens"
                pool = BlockPool(dense, tail_blocks, device, capacity_hint=tail_hint, stacked=True)
                sealed = BlockFormat(
                    self.block_size, self.num_layers, kv_heads, head_dim, dtype,
                    layer_bits=self.layer_bits, group_size=config.quantization_group_size,
                )  # fmt: skip
                # A sequence never seals its newest `residual_tokens` tokens.
                sealable = blocks_needed(max(0, config.max_tokens - config.residual_tokens), self.block_size)
                count, hint = self._pool_size(sealed, batch_size * max(1, sealable), pool.memory_bytes)
                quantized_pool = BlockPool(sealed, count, device, capacity_hint=hint, stacked=True)
                self.sealer = Sealer(pool, quantized_pool, config.residual_tokens)
            # Both pools exist: only now does the store hold them (a failure above leaves it uninitialized).
            self.pool, self.quantized_pool, self.model_dtype = pool, quantized_pool, dtype
            self._reads = StoreReads(pool, quantized_pool, dtype, config.cache_mode is CacheMode.TRAINING)
            if config.evicts_tokens and config.cache_strategy is not CacheStrategy.LRU:
                self._mass = AttentionMass(self.num_layers, kv_heads, device)

    def _pool_size(self, fmt: BlockFormat, default: int, reserved_bytes: int) -> tuple[int, str]:
        """Blocks of `fmt` in the pool and the config field that sets it (for error messages)."""
        config = self.config
        if config.num_blocks is not None:
            return config.num_blocks, "num_blocks"
        if config.memory_budget_mb is None:
            return default, "num_blocks (or max_tokens)"
        count = int((config.memory_budget_mb * 2**20 - reserved_bytes) // fmt.bytes_per_block)
        if count < 1:
            raise CacheMemoryError(
                f"memory_budget_mb={config.memory_budget_mb} holds no block of {fmt.describe()} after "
                f"{reserved_bytes / 2**20:.3f} MiB of full-precision tail; raise memory_budget_mb to at least "
                f"{(reserved_bytes + fmt.bytes_per_block) / 2**20:.3f}"
            )
        return count, "memory_budget_mb"

    # ------------------------------------------------------------------------------------------- sequences
    def add_sequence(self) -> int:
        """Register an empty sequence and return its id."""
        with self._lock:
            seq_id = self._next_id
            self._next_id += 1
            self._tables[seq_id] = BlockTable.empty(self.num_layers)
            return seq_id

    @_memory_errors
    def adopt_blocks(self, seq_id: int, sealed_ids: Sequence[int], dense_ids: Sequence[int], num_tokens: int) -> None:
        """Start an empty sequence with existing blocks, shared copy-on-write (a prefix cache's, a swap's copies).

        `sealed_ids`: quantized blocks holding its first tokens (whole blocks, quantized stores only); then
        `dense_ids`: full-precision blocks holding the rest, `num_tokens` tokens in all and in every layer (the
        last block may be partly filled). Each block gains one reference.
        """
        with self._lock:
            table = self._table(seq_id)
            sealed_tokens = len(sealed_ids) * self.block_size
            if table.num_tokens or table.quantized_ids or table.dense_blocks:
                raise CacheValidationError(f"sequence {seq_id} is not empty; blocks can only start a sequence")
            if self.pool is None or (sealed_ids and self.quantized_pool is None):
                raise CacheValidationError("the pool is not allocated yet (or not quantized); initialize it first")
            if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
                raise CacheValidationError(f"num_tokens={num_tokens!r} must be an int")
            if num_tokens < sealed_tokens or blocks_needed(num_tokens - sealed_tokens, self.block_size) != len(
                dense_ids
            ):
                raise CacheValidationError(
                    f"{len(sealed_ids)} sealed and {len(dense_ids)} full-precision blocks of {self.block_size} "
                    f"tokens cannot hold exactly num_tokens={num_tokens}"
                )
            self.pool.check_held(dense_ids)  # both pools first: nothing is shared unless all can be
            if self._mass is not None:  # room for the scores first: growing them below allocates nothing
                for layer in range(self.num_layers):
                    self._mass.reserve([seq_id], layer, num_tokens)
            if self.quantized_pool is not None:
                self.quantized_pool.share(sealed_ids)
            self.pool.share(dense_ids)
            table.quantized_ids = list(sealed_ids)
            table.dense_blocks = {len(sealed_ids) + i: block for i, block in enumerate(dense_ids)}
            table.layer_sealed = [sealed_tokens] * self.num_layers
            table.layer_lengths = [num_tokens] * self.num_layers
            if self._mass is not None:
                for layer in range(self.num_layers):
                    self._mass.grow([seq_id], layer, num_tokens)
            self._version += 1

    @_memory_errors
    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every block of `seq_id` (no copy until one of them writes a shared block)."""
        with self._lock:
            table = self._table(seq_id).copy()
            new_id = self._next_id
            if self._mass is not None:  # the only allocation: first, so that failing changes nothing
                self._mass.fork(seq_id, new_id)
            if self.pool is not None:
                self.pool.share(table.block_ids)
            if self.quantized_pool is not None:
                self.quantized_pool.share(table.quantized_ids)
            self._next_id += 1
            self._tables[new_id] = table
            self._version += 1  # its blocks are shared now: no layer may write them in place
            return new_id

    def replace_rows(self, seq_ids: Sequence[int], sources: Sequence[int]) -> list[int]:
        """Rebuild a batch: new row `i` continues old row `sources[i]` (blocks shared, copy-on-write), then the
        old rows are freed. Beam reordering, selection and repetition are all this. Returns the new sequence ids.
        """
        with self._lock:
            if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < len(seq_ids) for s in sources):
                raise CacheValidationError(
                    f"batch indices {list(sources)} are out of range for a batch of {len(seq_ids)}"
                )
            new_ids: list[int] = []
            version, next_id = self._version, self._next_id
            try:
                new_ids += (self.fork(seq_ids[source]) for source in sources)
            except BaseException:  # a fork ran out of memory: drop the ones made, as if none had been
                for new_id in new_ids:
                    self.free(new_id)
                self._version, self._next_id = version, next_id
                raise
            for seq_id in seq_ids:
                self.free(seq_id)
            return new_ids

    def free(self, seq_id: int) -> None:
        """Forget a sequence and release its blocks."""
        with self._lock:
            table = self._table(seq_id)
            del self._tables[seq_id]
            self._unsealed_finite.pop(seq_id, None)
            if self._mass is not None:
                self._mass.drop(seq_id)
            if self.pool is not None:
                self.pool.release(table.block_ids)
            if self.quantized_pool is not None:
                self.quantized_pool.release(table.quantized_ids)
            self._version += 1

    @_memory_errors
    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens of a sequence (in every layer) and release emptied blocks.

        Cutting inside a sealed block turns its kept tokens back into a full-precision block (dequantized).
        A cut drops the NaN/Inf check that `append(..., seal=False)` left for `seal`: cut after `seal`, or to undo
        those appends.
        """
        with self._lock:
            if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
                raise CacheValidationError(f"num_tokens={num_tokens!r} must be an int >= 0")
            table = self._table(seq_id)
            if num_tokens >= table.num_tokens:
                return
            self._unsealed_finite.pop(seq_id, None)
            if self.sealer is not None and max(table.layer_sealed) > num_tokens:
                self.sealer.unseal(table, num_tokens)
            table.layer_lengths = [min(length, num_tokens) for length in table.layer_lengths]
            if self._mass is not None:
                self._mass.truncate(seq_id, num_tokens)
            self._release_beyond(table)
            self._version += 1

    def reset(self) -> None:
        """Free every sequence (the pools stay allocated); in training mode also drop the autograd history."""
        with self._lock:
            for seq_id in list(self._tables):
                self.free(seq_id)
            if self.pool is not None and self.config.cache_mode is CacheMode.TRAINING:
                self.pool.detach_()

    def num_tokens(self, seq_id: int, layer: int | None = None) -> int:
        """Tokens of a sequence in `layer` (or the furthest any layer has written)."""
        with self._lock:
            table = self._table(seq_id)
            return table.num_tokens if layer is None else table.layer_lengths[self._layer(layer)]

    def num_seen(self, seq_id: int, layer: int) -> int:
        """Tokens a sequence has seen in `layer`, evicted ones included (the next token's position)."""
        with self._lock:
            table = self._table(seq_id)
            return table.layer_lengths[self._layer(layer)] + table.layer_evicted[layer]

    def num_sealed(self, seq_id: int, layer: int) -> int:
        """Tokens of a sequence held in quantized blocks in `layer`."""
        with self._lock:
            return self._table(seq_id).layer_sealed[self._layer(layer)]

    def block_ids(self, seq_id: int) -> list[int]:
        """The full-precision block ids of a sequence, oldest first."""
        with self._lock:
            return self._table(seq_id).block_ids

    def dense_blocks(self, seq_id: int) -> dict[int, int]:
        """`{logical block: full-precision block id}` of a sequence."""
        with self._lock:
            return dict(self._table(seq_id).dense_blocks)

    def quantized_block_ids(self, seq_id: int) -> list[int]:
        with self._lock:
            return list(self._table(seq_id).quantized_ids)

    def token_totals(self) -> tuple[int, int, int]:
        """`(sequences, tokens held, tokens seen)` over every sequence, read at one instant."""
        with self._lock:
            tables = list(self._tables.values())
            return (
                len(tables),
                sum(t.num_tokens for t in tables),
                sum(t.layer_lengths[0] + t.layer_evicted[0] for t in tables),
            )

    @property
    def sequence_ids(self) -> list[int]:
        with self._lock:
            return list(self._tables)

    # ---------------------------------------------------------------------------------------- write / read
    @_memory_errors
    def append(
        self, seq_ids: Sequence[int], layer: int, key: torch.Tensor, value: torch.Tensor, seal: bool = True
    ) -> None:
        """Append `tokens` new tokens to each sequence in `layer`.

        Args:
            seq_ids: one sequence id per batch row.
            layer: layer index in `[0, num_layers)`.
            key, value: `[batch, kv_heads, tokens, head_dim]`, the model's float dtype, on the pool's device.
            seal: False leaves every new token in full precision, whatever the residual window, and defers the
                NaN/Inf check to `seal(seq_ids)`, which the caller calls once every layer holds its tokens: it
                seals all layers together and reads every deferred check in the same sync (one instead of one per
                layer). A failed check there leaves the tokens stored unsealed; the caller truncates them.
                `fits_unsealed` says whether the pools have the room.
        """
        with self._lock:
            # The NaN/Inf check of a quantized store reads a device flag: deferred to the sealing sync if this
            # append seals (one sync, not two), to `seal` if it does not, else read before the first write.
            deferred = self._checks_finite and (self.pool is not None or not seal)
            self.validate_inputs(seq_ids, layer, key, value, check_values=not deferred)
            finite = finite_flag(key, value) if deferred else None
            finite, unsealed_finite = (finite, None) if seal else (None, finite)
            if self.config.cache_mode is CacheMode.INFERENCE:
                key, value = key.detach(), value.detach()  # the cache stores values, not autograd history
            if self.pool is None:
                self.initialize(key.shape[1], key.shape[3], key.dtype, key.device, len(seq_ids))
            count = key.shape[2]
            if count == 0:
                return
            tables = [self._table(s) for s in seq_ids]
            assert self.pool is not None
            dtype = self.pool.block_format.dtype
            rows = (token_rows(key, dtype), token_rows(value, dtype))
            if self._mass is not None:  # room for the new tokens' scores now: `grow` below allocates nothing
                self._mass.reserve(seq_ids, layer, count)
            sealing = None if seal else 0
            runs = self._in_place_runs(tables, layer, count, sealing)
            if runs is None:
                self._append_planned(tables, layer, rows, count, sealing=sealing, rows_finite=finite)
            else:  # a decode step or a chunk after the first layer: the blocks are there, nothing to plan
                require_finite(finite)
                write_runs(self.pool.dense(layer), runs, rows, self._slot_tensor)
            for table in tables:
                table.layer_lengths[layer] += count
            if unsealed_finite is not None:
                for seq_id in seq_ids:
                    pending = self._unsealed_finite.get(seq_id)
                    both = unsealed_finite if pending is None else unsealed_finite & pending
                    self._unsealed_finite[seq_id] = both
            if self._mass is not None:  # a new token has received no attention yet
                self._mass.grow(seq_ids, layer, count)

    def _append_planned(
        self,
        tables: list[BlockTable],
        layer: int,
        rows: TokenRows | None,
        count: int,
        sealing: int | None = None,
        rows_finite: torch.Tensor | None = None,
    ) -> None:
        """Write `count` new tokens per table, `rows` (`[batch * count, kv_heads, head_dim]`, storage dtype), of
        `layer` after planning where they go: allocate blocks, copy shared ones, seal what leaves the residual
        window (as after `sealing` tokens, if given: `reserve`'s padding does not count). `rows=None` plans and
        seals only (`reserve`: the caller writes the tokens; nothing sealed may include them). Lengths are the
        caller's. Quantizing reads the blocks as they are; the block changes and the index tensors built on them
        are undone if one fails; the pools are written last (module docstring). `rows_finite`: the device flag of
        `append`'s deferred NaN/Inf check, read (a sync) before anything is written."""
        pool, sealer = self.pool, self.sealer
        assert pool is not None
        plans = [self._plan(table, layer, count, sealing) for table in tables]
        seals = sealer.plan(tables, plans, layer) if sealer else []
        self._check_capacity(tables, plans, seals)
        if not seals:
            require_finite(rows_finite)
        encoded = sealer.encode(seals, rows, rows_finite) if seals and sealer else []
        with self._atomic(tables):
            sealed = sealer.assign(seals, encoded) if seals and sealer else None
            if sealed is not None:
                self._version += 1
                for table in tables:
                    self._release_sealed(table)
            copies = self._allocate_dense(tables, plans)
            write = dense_write(pool.dense(layer), tables, plans, rows) if rows is not None else None
        if sealed is not None and sealer:
            sealer.write(sealed)
        pool.copy_blocks(copies)
        if write is not None:
            write.apply()

    @contextmanager
    def _atomic(self, tables: list[BlockTable]) -> Iterator[None]:
        """Undo every change to `tables`, to the pools' allocators and to the version made inside the `with` block
        if it raises. Block data is not undone: the block must not write into the pools."""
        saved, version = [table.copy() for table in tables], self._version
        with ExitStack() as pools:
            for pool in (self.pool, self.quantized_pool):
                if pool is not None:
                    pools.enter_context(pool.atomic())
            try:
                yield
            except BaseException:
                for table, before in zip(tables, saved, strict=True):
                    table.restore(before)
                self._version = version
                raise

    @_memory_errors
    def reserve(
        self,
        seq_ids: Sequence[int],
        count: int = 1,
        real: int | None = None,
        seal_after: bool = False,
        held_version: int | None = None,
    ) -> ReservedStep:
        """Make room for `count` new tokens per sequence in every layer, without writing them.

        Everything `append` does but the copy: blocks are allocated (copied first where shared), what leaves the
        residual window is sealed, and every layer's length already counts the new tokens. Their slots are the
        same in every layer; the caller must write each layer's new tokens there
        (`pool.dense(layer).write(slots, keys, values)`) before anything reads that layer. This is how a decode
        step captured in a CUDA graph stores its tokens (`kv_cache.decode_graphs`): the host plans, the graph
        writes.

        `real` < `count`: only the first `real` tokens of each sequence are real, the rest padding (a step graph
        of a fixed width): sealing is what appending `real` tokens would seal, and the caller cuts the padding off
        afterwards with `truncate(seq_id, positions[i] + real)`.

        `seal_after=True`: nothing is sealed now, whatever the window; every new token gets a full-precision slot,
        and the caller calls `seal(seq_ids)` once the tokens are written (and the padding cut off). A chunk longer
        than the window then attends to its own tokens in full precision (KIVI's prefill) where `append` would
        have sealed part of it first.

        `held_version`: the version of the block tables (of these same sequences) the caller holds; when the store
        is still at it, the returned rows carry only the lengths.

        Needs every layer of each sequence at the same length (as between model steps), no attention-mass
        tracking, and a residual window of at least `real` tokens unless `seal_after` (sealing must not need the
        unwritten tokens).
        Raises `CacheMemoryError` with nothing changed when the pools cannot hold the tokens.
        """
        with self._lock:
            if self.pool is None:
                raise CacheValidationError("reserve follows a first append (the pools are allocated by it)")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise CacheValidationError(f"count={count!r} must be an int >= 1")
            real = count if real is None else real
            if isinstance(real, bool) or not isinstance(real, int) or not 1 <= real <= count:
                raise CacheValidationError(f"real={real!r} must be an int in [1, count={count}]")
            if len(set(seq_ids)) != len(seq_ids) or not seq_ids:
                raise CacheValidationError(f"seq_ids={list(seq_ids)} must name distinct sequences, at least one")
            tables = [self._table(s) for s in seq_ids]
            if any(len(set(t.layer_lengths)) != 1 or len(set(t.layer_sealed)) != 1 for t in tables):
                raise CacheValidationError("reserve needs every layer of a sequence at the same length and sealing")
            if self._mass is not None:
                raise CacheValidationError("reserve does not track attention mass (token eviction by LFU/ADAPTIVE)")
            sealing = 0 if seal_after else real
            if self.sealer is not None and not seal_after and self.config.residual_tokens < real:
                raise CacheValidationError(
                    f"reserve of {real} tokens needs residual_tokens >= {real} (got {self.config.residual_tokens})"
                )
            slots = self._in_place_slots(tables, 0, count, sealing)
            if slots is None:  # a block boundary or a seal: plan layer 0; it seals the other layers alike
                for layer in range(self.num_layers):
                    if self._in_place_slots(tables, layer, count, sealing) is None:
                        self._append_planned(tables, layer, None, count, sealing)
                slots = self._in_place_slots(tables, 0, count, sealing)
                assert slots is not None
            for table in tables:
                table.layer_lengths[:] = [length + count for length in table.layer_lengths]
            positions = [t.layer_lengths[0] + t.layer_evicted[0] - count for t in tables]
            blocks = held_version != self._version
            rows = view_rows(tables, 0, self.block_size, self.quantized_pool is not None, blocks)
            return ReservedStep(slots, positions, rows, self._version)

    @_memory_errors
    def seal(self, seq_ids: Sequence[int]) -> None:
        """Seal every whole block older than the residual window in every layer of the sequences (after a
        `reserve(..., seal_after=True)` step has written its tokens); nothing to do without quantization."""
        with self._lock:
            if self.sealer is None:
                return
            tables = [self._table(s) for s in seq_ids]
            flags = [self._unsealed_finite.pop(s) for s in seq_ids if s in self._unsealed_finite]
            finite = functools.reduce(torch.logical_and, flags) if flags else None
            for layer in range(self.num_layers):
                if any(self.sealer.target(t, layer, 0) > t.layer_sealed[layer] for t in tables):
                    self._append_planned(tables, layer, None, 0, rows_finite=finite)
                    finite = None  # read with the first seal's sync
            require_finite(finite)

    def fits_unsealed(self, seq_ids: Sequence[int], count: int) -> bool:
        """Whether `count` more tokens per sequence fit in the full-precision pool with nothing sealed (`append(...,
        seal=False)` in every layer; the layers share their blocks), and what `seal` then seals fits in the
        quantized pool. Needs every layer of each sequence at the same length, as between model steps."""
        with self._lock:
            if self.pool is None:
                return False
            tables = [self._table(s) for s in seq_ids]
            if any(t.layer_lengths[0] + count > self.config.max_tokens for t in tables):
                return False
            unsealed = [self._plan(table, 0, count, 0) for table in tables]
            if self._needs(tables, unsealed, [])[0] > self.pool.num_free:
                return False
            sealed = sum(self._plan(table, 0, count).new_sealed for table in tables)
            return self.quantized_pool is None or sealed <= self.quantized_pool.num_free

    def _in_place_runs(
        self, tables: list[BlockTable], layer: int, count: int, sealing: int | None = None
    ) -> tuple[tuple[int, int], ...] | None:
        """Where every new token goes, as `(first slot, tokens)` runs in row order (table by table, `count` each;
        adjacent runs merged), when the new tokens of `layer` all go into full-precision blocks the table already
        holds alone and nothing is sealed (in a decode step or a prefill chunk, every layer after the one that
        allocated the blocks); else None, and `append` plans the write. `sealing`: the tokens that count for
        sealing (`reserve`'s real ones), `count` by default. A prompt of fresh blocks is usually one run: one copy,
        and no per-token work on the host.

        The answer depends on the tables' blocks and sharing (the store's version: allocation, release, sealing and
        forks change it) and on each table's length and sealed length in `layer`: the layers of one step share one
        computation (the first layer's, or the second's after the first allocated)."""
        key = (
            tuple(map(id, tables)),
            tuple(t.layer_lengths[layer] for t in tables),
            tuple(t.layer_sealed[layer] for t in tables),
            count,
            sealing,
        )
        runs = self._runs.get(key, self._version)
        if runs is None:
            runs = self._find_in_place_runs(tables, layer, count, sealing)
            if runs is not None:
                self._runs.put(key, self._version, runs)
        return runs

    def _find_in_place_runs(
        self, tables: list[BlockTable], layer: int, count: int, sealing: int | None
    ) -> tuple[tuple[int, int], ...] | None:
        """`_in_place_runs`, computed."""
        pool, sealer, size, max_tokens = self.pool, self.sealer, self.block_size, self.config.max_tokens
        assert pool is not None
        runs: list[list[int]] = []
        for table in tables:
            start = table.layer_lengths[layer]
            end = start + count
            if end > max_tokens or (
                sealer is not None
                and sealer.target(table, layer, count if sealing is None else sealing) > table.layer_sealed[layer]
            ):
                return None
            for logical in range(start // size, (end - 1) // size + 1):
                block = table.dense_blocks.get(logical)
                if block is None or pool.ref_count(block) > 1:
                    return None
                shift = (block - logical) * size  # token position -> slot inside this block
                first = max(start, logical * size) + shift
                tokens = min(end, (logical + 1) * size) + shift - first
                if runs and runs[-1][0] + runs[-1][1] == first:
                    runs[-1][1] += tokens
                else:
                    runs.append([first, tokens])
        return tuple((first, tokens) for first, tokens in runs)

    def _in_place_slots(
        self, tables: list[BlockTable], layer: int, count: int, sealing: int | None = None
    ) -> tuple[int, ...] | None:
        """`_in_place_runs` as every new token's slot (what `reserve` hands its caller)."""
        runs = self._in_place_runs(tables, layer, count, sealing)
        return None if runs is None else _slots_of(runs)

    def _slot_tensor(self, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """The slots of `runs` as an int64 tensor on the pool's device, cached: the layers of one decode step write
        the same slots, so they share one host-to-device copy. The key is the runs themselves, valid at every store
        version (stored at version 0)."""
        assert self.pool is not None
        cached = self._slot_tensors.get(runs, 0)
        if cached is None:
            tensor = device_tensor(_slots_of(runs), torch.long, self.pool.device)
            cached = self._slot_tensors.put(runs, 0, tensor)
        return cached

    def blocks_needed_for_append(self, seq_id: int, count: int) -> tuple[int, int]:
        """Blocks that appending `count` tokens to every layer of a sequence allocates: `(full-precision, sealed)`,
        the full-precision count net of the blocks its sealing releases.

        This is what `append` checks before layer 0 writes (the later layers fill the blocks layer 0 allocated),
        for a sequence whose layers hold the same number of tokens, as between model steps.
        """
        with self._lock:
            if self.pool is None:
                raise CacheValidationError("the pool is not allocated yet; initialize it first")
            table = self._table(seq_id)
            plans = [self._plan(table, 0, count)]
            seals = self.sealer.plan([table], plans, 0) if self.sealer else []
            dense, released, sealed = self._needs([table], plans, seals)
            return max(0, dense - released), sealed

    @_memory_errors
    def read(self, seq_ids: Sequence[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the sequences in `layer`, oldest first, for attention (dequantized if sealed).

        All sequences must hold the same number of tokens in `layer`. Returns two `[batch, kv_heads, tokens,
        head_dim]` tensors in the model's dtype, valid until the next call on the store, the way attention
        consumes them (clone them to keep them): views of the pool itself when one sequence's blocks are one
        run of consecutive ids (no copy at all), else of a per-thread workspace that this thread's next `read`
        overwrites.
        """
        with self._lock:
            return self._reader().read(self._batch(seq_ids), self._layer(layer))

    @_memory_errors
    def keep_tokens(self, seq_ids: Sequence[int], layer: int, keep: torch.Tensor) -> None:
        """Evict every token of `layer` but `keep` and compact the kept ones to the front (order preserved).

        keep: `[batch, kv_heads, kept]` int64 cache indices, ascending per row and head (each KV head may keep
        different tokens; all keep the same number). Blocks no layer needs any more are released.
        """
        with self._lock:
            tables = [self._table(s) for s in seq_ids]
            pool = self.pool
            if pool is None or self.quantized_pool is not None:
                raise CacheValidationError("token eviction needs an allocated full-precision (unquantized) store")
            self._layer(layer)
            _check_keep(keep, pool.block_format.kv_heads, [table.layer_lengths[layer] for table in tables])
            self._compact(seq_ids, tables, layer, keep)
            for table in tables:
                table.layer_evicted[layer] += table.layer_lengths[layer] - keep.shape[-1]
                table.layer_lengths[layer] = keep.shape[-1]
                self._release_beyond(table)

    def _compact(self, seq_ids: Sequence[int], tables: list[BlockTable], layer: int, keep: torch.Tensor) -> None:
        """Move the kept tokens (`keep`: `[batch, kv_heads, kept]`) of `layer` to the front of each row's blocks,
        copying shared blocks first, and keep their attention mass. Everything that allocates (copy-on-write
        blocks, which `_atomic` undoes; slot indices; the gathered tokens and scores) comes before the writes."""
        pool = self.pool
        assert pool is not None
        front = range(blocks_needed(keep.shape[-1], self.block_size))
        storages = (pool.dense(layer).key_slots, pool.dense(layer).value_slots)
        with self._atomic(tables):  # a row short of free blocks for its copies leaves every row as it was
            sources = [self._slots(table, table.layer_lengths[layer]) for table in tables]  # the blocks as they were
            copies = [pair for table in tables for pair in self._make_private(table, front)]
            targets = torch.cat([self._slots(table, keep.shape[-1]) for table in tables])
            moved = kept_tokens(storages, sources, keep)
            if self._mass is not None:
                self._mass.keep(seq_ids, layer, keep)  # the last allocation, all rows or none
        pool.copy_blocks(copies)
        compact(storages, targets, moved)

    @_memory_errors
    def add_attention_mass(self, seq_ids: Sequence[int], layer: int, mass: torch.Tensor) -> None:
        """Accumulate attention received per token: mass `[batch, kv_heads, tokens]` (fp32, tokens = held)."""
        with self._lock:
            if self._mass is None:
                raise CacheValidationError("this store does not track attention mass (no LFU/ADAPTIVE eviction)")
            for seq_id in seq_ids:
                self._table(seq_id)
            self._mass.add(seq_ids, layer, mass)

    def attention_mass(self, seq_id: int, layer: int) -> torch.Tensor:
        """Accumulated attention per held token of one sequence: `[kv_heads, tokens]` fp32."""
        with self._lock:
            if self._mass is None:
                raise CacheValidationError("this store does not track attention mass (no LFU/ADAPTIVE eviction)")
            self._table(seq_id)
            return self._mass.read(seq_id, layer)

    def _slots(self, table: BlockTable, length: int) -> torch.Tensor:
        assert self.pool is not None
        return token_slots(table, length, self.block_size, self.pool.device)

    def _make_private(self, table: BlockTable, logicals: Sequence[int]) -> list[tuple[int, int]]:
        """Give `table` private blocks for the shared full-precision ones among `logicals`, which are about to be
        rewritten (the last holder keeps a block); returns the copies `(src, dst)` to make (`copy_blocks`) before
        writing them."""
        assert self.pool is not None
        shared = [x for x in logicals if self.pool.ref_count(table.dense_blocks[x]) > 1]
        if len(shared) > self.pool.num_free:
            raise CacheMemoryError(
                f"requested {len(shared)} blocks (copy-on-write) but only {self.pool.num_free} are free; "
                f"raise {self.pool.capacity_hint}"
            )
        copies = []
        for logical in shared:
            old = table.dense_blocks[logical]
            (table.dense_blocks[logical],) = self.pool.allocate(1)
            copies.append((old, table.dense_blocks[logical]))
            self.pool.release([old])
            self._version += 1
        return copies

    def _release_beyond(self, table: BlockTable) -> None:
        """Release full-precision blocks past what any layer holds."""
        keep = blocks_needed(table.num_tokens, self.block_size)
        dropped = [logical for logical in table.dense_blocks if logical >= keep]
        if dropped and self.pool is not None:
            self.pool.release(table.dense_blocks.pop(logical) for logical in dropped)
            self._version += 1

    @_memory_errors
    def paged_kv(self, seq_ids: Sequence[int], layer: int) -> PagedKV:
        """`layer` of the sequences as the attention kernels read it: block tables and lengths, no copy.

        Rows may hold different numbers of tokens (see `block_views.paged_view`).
        """
        with self._lock:
            return self._reader().paged_kv(self._batch(seq_ids), self._layer(layer))

    def _reader(self) -> StoreReads:
        if self._reads is None:
            raise CacheValidationError("the cache holds no tokens yet")
        return self._reads

    def _batch(self, seq_ids: Sequence[int]) -> ReadBatch:
        return ReadBatch(tuple(seq_ids), [self._table(s) for s in seq_ids], self._version)

    # ------------------------------------------------------------------------------------------ invariants
    def check_invariants(
        self, dense_holders: Sequence[Sequence[int]] = (), quantized_holders: Sequence[Sequence[int]] = ()
    ) -> None:
        """Raise `CacheError` if a block leaked, is double-counted, or a table does not cover its tokens.

        `dense_holders` / `quantized_holders`: block ids referenced by holders other than the sequences (a prefix
        cache), one list per reference.
        """
        with self._lock:
            if self.pool is None:
                return
            self.pool.check_invariants([*(t.block_ids for t in self._tables.values()), *dense_holders])
            if self.quantized_pool is not None:
                sealed_holders = [*(t.quantized_ids for t in self._tables.values()), *quantized_holders]
                self.quantized_pool.check_invariants(sealed_holders)
            for seq_id, table in self._tables.items():
                needed = {
                    logical
                    for length, sealed in zip(table.layer_lengths, table.layer_sealed, strict=True)
                    for logical in range(sealed // self.block_size, blocks_needed(length, self.block_size))
                }
                held = set(table.dense_blocks)
                lowest = min(table.layer_sealed) // self.block_size
                if (
                    not needed <= held
                    or any(logical < lowest for logical in held)
                    or (len(table.quantized_ids) * self.block_size != max(table.layer_sealed))
                ):
                    raise CacheValidationError(f"sequence {seq_id}: blocks do not cover its tokens: {table}")

    # ----------------------------------------------------------------------------------------------- inner
    def _table(self, seq_id: int) -> BlockTable:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise CacheValidationError(f"sequence id {seq_id!r} is not in this cache") from None

    def _layer(self, layer: int) -> int:
        """`layer` if it names one of this store's layers, else `CacheValidationError`."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise CacheValidationError(f"layer={layer!r} is out of range; this cache has {self.num_layers} layers")
        return layer

    def _plan(self, table: BlockTable, layer: int, count: int, sealing: int | None = None) -> WritePlan:
        """Where `count` new tokens of `layer` go, sealing every whole block older than the residual window (after
        `sealing` new tokens if given)."""
        seal_to = self.sealer.target(table, layer, count if sealing is None else sealing) if self.sealer else 0
        return plan_append(table, layer, count, self.block_size, seal_to)

    def _needs(self, tables: list[BlockTable], plans: list[WritePlan], seals: list[SealBatch]) -> tuple[int, int, int]:
        """`(full-precision blocks allocated, full-precision blocks released by sealing, sealed blocks allocated)`
        by `plans`: new blocks plus copy-on-write copies of shared ones."""
        pool = self.pool
        assert pool is not None
        shared = [
            [b for b in (t.dense_blocks[x] for x in p.overwritten) if pool.ref_count(b) > 1]
            for t, p in zip(tables, plans, strict=True)
        ]
        dense = sum(len(p.new_dense) for p in plans) + _copies_needed(pool, shared)
        released = self.sealer.released_by(tables, seals) if self.sealer else 0
        sealed = sum(p.new_sealed for p in plans)
        if self.sealer is not None and self.quantized_pool is not None:
            sealed += _copies_needed(self.quantized_pool, self.sealer.shared_writes(seals))
        return dense, released, sealed

    def _check_capacity(self, tables: list[BlockTable], plans: list[WritePlan], seals: list[SealBatch]) -> None:
        """Raise `CacheMemoryError`, before anything changes, if the pools cannot hold what `plans` need."""
        for plan in plans:
            if plan.end > self.config.max_tokens:
                raise CacheMemoryError(
                    f"a sequence would hold {plan.end} tokens but max_tokens={self.config.max_tokens}; raise max_tokens"
                )
        dense, released, sealed = self._needs(tables, plans, seals)
        for target, needed, freed in ((self.pool, dense, released), (self.quantized_pool, sealed, 0)):
            if target is not None and needed > target.num_free + freed:
                raise CacheMemoryError(
                    f"requested {needed} blocks but only {target.num_free + freed} of {target.num_blocks} are free "
                    f"({self.block_size} tokens each); raise {target.capacity_hint}, or free or shorten sequences"
                )

    def _allocate_dense(self, tables: list[BlockTable], plans: list[WritePlan]) -> list[tuple[int, int]]:
        """Give each table the full-precision blocks its plan writes: new ones, and private copies of shared ones;
        returns the copies `(src, dst)` to make before writing."""
        pool = self.pool
        assert pool is not None
        copies = []
        for table, plan in zip(tables, plans, strict=True):
            if plan.new_dense:
                table.dense_blocks.update(zip(plan.new_dense, pool.allocate(len(plan.new_dense)), strict=True))
                self._version += 1
            copies += self._make_private(table, plan.overwritten)
        return copies

    def _release_sealed(self, table: BlockTable) -> None:
        """Release full-precision blocks that every layer has sealed."""
        lowest = min(table.layer_sealed) // self.block_size
        done = [logical for logical in table.dense_blocks if logical < lowest]
        if done and self.pool is not None:
            self.pool.release(table.dense_blocks.pop(logical) for logical in done)
            self._version += 1

    def validate_inputs(
        self,
        seq_ids: Sequence[int] | None,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        check_values: bool = True,
    ) -> None:
        """Raise `CacheValidationError` unless `append(seq_ids, layer, key, value)` would accept these inputs.

        `seq_ids=None` checks everything but the batch size; `check_values=False` everything but NaN/Inf (a quantized
        store's check, a device sync).
        """
        self._layer(layer)
        if seq_ids is not None and len(set(seq_ids)) != len(seq_ids):
            raise CacheValidationError(f"seq_ids={list(seq_ids)} names a sequence twice; each row needs its own")
        expected = StateSpec(
            batch=None if seq_ids is None else len(seq_ids),
            block_format=None if self.pool is None else self.pool.block_format,
            dtype=self.model_dtype,
            device=self.pool.device if self.pool is not None else self._configured_device(),
            finite=check_values and self._checks_finite,
        )
        check_states(key, value, expected)

    @property
    def _checks_finite(self) -> bool:
        """Whether appends refuse NaN/Inf (quantized stores, unless `check_finite=False`)."""
        return self.layer_bits is not None and self.config.check_finite

    def _configured_device(self) -> torch.device | None:
        return None if self.config.device == "auto" else self.config.resolved_device()


def _slots_of(runs: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """Every slot of `(first slot, tokens)` runs, in order."""
    return tuple(slot for first, tokens in runs for slot in range(first, first + tokens))


def _check_keep(keep: torch.Tensor, kv_heads: int, lengths: list[int]) -> None:
    """`keep` must be `[batch, kv_heads, kept]` integer indices, row `b`'s in `[0, lengths[b])`, strictly ascending."""
    problem = None
    batch = len(lengths)
    if not isinstance(keep, torch.Tensor) or keep.dim() != 3 or keep.shape[:2] != (batch, kv_heads):
        problem = f"keep must be [batch={batch}, kv_heads={kv_heads}, kept]"
    elif keep.dtype.is_floating_point or keep.dtype == torch.bool or keep.is_complex():
        problem = f"keep must hold integer indices, not {keep.dtype}"
    elif keep.shape[-1] > min(lengths) or (
        keep.numel() and (int(keep.min()) < 0 or bool((keep.amax((1, 2)).cpu() >= torch.tensor(lengths)).any()))
    ):
        problem = f"keep indices must lie in [0, held) for each row (held: {lengths})"
    elif keep.shape[-1] > 1 and not bool((keep[..., 1:] > keep[..., :-1]).all()):
        problem = "keep indices must be strictly ascending per row and head"
    if problem is not None:
        shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise CacheValidationError(f"{problem}; got {shape}")


def _copies_needed(pool: BlockPool, shared: list[list[int]]) -> int:
    """Blocks copy-on-write will allocate: a block with r holders, k of them writing now, needs k copies if
    r > k, else k - 1 (the last writer keeps it)."""
    writers: dict[int, int] = {}
    for block_ids in shared:
        for block_id in block_ids:
            writers[block_id] = writers.get(block_id, 0) + 1
    return sum(k if pool.ref_count(b) > k else k - 1 for b, k in writers.items())
