"""`KVStore`: the block tables of many sequences over preallocated block pools.

It is the one place that writes and reads a sequence's tokens: `append` finds (or allocates) the slots for new
tokens and copies them in, `read` gathers what attention needs, `fork` shares every block with a new sequence,
and a write into a shared block first copies it (copy-on-write). Every public method takes the store's lock, so
threads may share one store.

With quantization there are two pools: `quantized_pool` holds sealed blocks (packed codes), `pool` the
full-precision tail of each sequence (its newest `residual_tokens` tokens or more); `sealing.Sealer` moves blocks
from one to the other as they age out of the window.

Inputs and outputs use Hugging Face's layout: `[batch, kv_heads, tokens, head_dim]`, one row per sequence id.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from kv_cache.block_format import BlockFormat
from kv_cache.block_io import token_rows, write_dense
from kv_cache.block_pool import BlockPool
from kv_cache.block_table import BlockTable, SealBatch, WritePlan, blocks_needed, plan_append
from kv_cache.config import CacheMode, KVCacheConfig
from kv_cache.errors import CacheMemoryError, CacheValidationError
from kv_cache.sealing import Sealer

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KVStore:
    """Sequences of key/value tokens for `num_layers` layers, stored in blocks of preallocated pools.

    The pools are created by `initialize`, or lazily by the first `append` from the shapes it sees.
    """

    def __init__(self, config: KVCacheConfig, num_layers: int) -> None:
        if num_layers < 1:
            raise CacheValidationError(f"num_layers={num_layers} must be >= 1")
        if config.cache_mode is CacheMode.TRAINING:
            raise CacheValidationError(
                "cache_mode=CacheMode.TRAINING is not supported by the paged store: it stores detached copies; "
                "use CacheMode.INFERENCE"
            )
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
        self._version = 0  # bumped whenever a block id list changes; keys the block-table tensor cache
        self._table_cache: dict[tuple[object, ...], tuple[int, torch.Tensor, int | None]] = {}
        self._read_buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------------- setup
    def initialize(
        self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, batch_size: int
    ) -> None:
        """Allocate the pools for tokens of `kv_heads` x `head_dim` from a model computing in `dtype`.

        Without `num_blocks` or `memory_budget_mb` in the config, the pools hold `batch_size` sequences of
        `max_tokens` tokens, plus one spare block per sequence for copy-on-write. With quantization the
        full-precision tail pool holds `batch_size` windows of `residual_tokens` plus three blocks (the block
        being filled, the one being sealed, and one spare), and the rest of a memory budget goes to sealed blocks.
        """
        with self._lock:
            if self.pool is not None:
                return
            config = self.config
            dense = BlockFormat(self.block_size, self.num_layers, kv_heads, head_dim, config.dtype or dtype)
            if self.layer_bits is None:
                num_blocks, hint = self._pool_size(dense, batch_size * (config.blocks_per_sequence + 1), 0)
                self.pool = BlockPool(dense, num_blocks, device, capacity_hint=hint)
            else:
                tail_blocks = batch_size * (config.residual_tokens // self.block_size + 3)
                tail_hint = "the batch size of the first call (the tail pool is sized from it) or residual_tokens"
                self.pool = BlockPool(dense, tail_blocks, device, capacity_hint=tail_hint)
                sealed = BlockFormat(
                    self.block_size, self.num_layers, kv_heads, head_dim, dtype,
                    layer_bits=self.layer_bits, group_size=config.quantization_group_size,
                )  # fmt: skip
                count, hint = self._pool_size(sealed, batch_size * config.blocks_per_sequence, self.pool.memory_bytes)
                self.quantized_pool = BlockPool(sealed, count, device, capacity_hint=hint)
                self.sealer = Sealer(self.pool, self.quantized_pool, config.residual_tokens)
            self.model_dtype = dtype

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

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every block of `seq_id` (no copy until one of them writes a shared block)."""
        with self._lock:
            table = self._table(seq_id).copy()
            if self.pool is not None:
                self.pool.share(table.block_ids)
            if self.quantized_pool is not None:
                self.quantized_pool.share(table.quantized_ids)
            new_id = self._next_id
            self._next_id += 1
            self._tables[new_id] = table
            return new_id

    def free(self, seq_id: int) -> None:
        """Forget a sequence and release its blocks."""
        with self._lock:
            table = self._table(seq_id)
            del self._tables[seq_id]
            if self.pool is not None:
                self.pool.release(table.block_ids)
            if self.quantized_pool is not None:
                self.quantized_pool.release(table.quantized_ids)
            self._version += 1

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens of a sequence (in every layer) and release emptied blocks.

        Cutting inside a sealed block turns its kept tokens back into a full-precision block (dequantized).
        """
        with self._lock:
            if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
                raise CacheValidationError(f"num_tokens={num_tokens!r} must be an int >= 0")
            table = self._table(seq_id)
            if num_tokens >= table.num_tokens:
                return
            if self.sealer is not None and max(table.layer_sealed) > num_tokens:
                self.sealer.unseal(table, num_tokens)
            table.layer_lengths = [min(length, num_tokens) for length in table.layer_lengths]
            keep = blocks_needed(table.num_tokens, self.block_size)
            dropped = [logical for logical in table.dense_blocks if logical >= keep]
            if self.pool is not None and dropped:
                self.pool.release(table.dense_blocks.pop(logical) for logical in dropped)
            self._version += 1

    def reset(self) -> None:
        """Free every sequence (the pools stay allocated)."""
        with self._lock:
            for seq_id in list(self._tables):
                self.free(seq_id)

    def num_tokens(self, seq_id: int, layer: int | None = None) -> int:
        """Tokens of a sequence in `layer` (or the furthest any layer has written)."""
        with self._lock:
            table = self._table(seq_id)
            return table.num_tokens if layer is None else table.layer_lengths[layer]

    def num_sealed(self, seq_id: int, layer: int) -> int:
        """Tokens of a sequence held in quantized blocks in `layer`."""
        with self._lock:
            return self._table(seq_id).layer_sealed[layer]

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

    @property
    def sequence_ids(self) -> list[int]:
        with self._lock:
            return list(self._tables)

    # ---------------------------------------------------------------------------------------- write / read
    def append(self, seq_ids: Sequence[int], layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append `tokens` new tokens to each sequence in `layer`.

        Args:
            seq_ids: one sequence id per batch row.
            layer: layer index in `[0, num_layers)`.
            key, value: `[batch, kv_heads, tokens, head_dim]`, the model's float dtype, on the pool's device.
        """
        with self._lock:
            self.validate_inputs(seq_ids, layer, key, value)
            key, value = key.detach(), value.detach()  # the cache stores values, never autograd history
            if self.pool is None:
                self.initialize(key.shape[1], key.shape[3], key.dtype, key.device, len(seq_ids))
            if key.shape[2] == 0:
                return
            tables = [self._table(s) for s in seq_ids]
            count = key.shape[2]
            sealer = self.sealer
            plans = [
                plan_append(t, layer, count, self.block_size, sealer.target(t, layer, count) if sealer else 0)
                for t in tables
            ]
            rows = (token_rows(key), token_rows(value))
            seals = sealer.plan(tables, plans, layer) if sealer else []
            self._check_capacity(tables, plans, seals)
            if seals and sealer:
                sealer.seal(seals, layer, rows)
                self._version += 1
                for table in tables:
                    self._release_sealed(table)
            self._allocate_dense(tables, plans)
            assert self.pool is not None
            write_dense(self.pool.dense(layer), tables, plans, rows)
            for table, plan in zip(tables, plans, strict=True):
                table.layer_lengths[layer] = plan.end

    def read(self, seq_ids: Sequence[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the sequences in `layer`, oldest first, for attention (dequantized if sealed).

        All sequences must hold the same number of tokens in `layer`. Returns two `[batch, kv_heads, tokens,
        head_dim]` tensors in the model's dtype, valid until the next call on the store, the way attention
        consumes them (clone them to keep them): views of the pool itself when one sequence's blocks are one
        run of consecutive ids (no copy at all), else of a workspace that the next `read` overwrites.
        """
        with self._lock:
            tables = [self._table(s) for s in seq_ids]
            lengths = {t.layer_lengths[layer] for t in tables}
            if len(lengths) != 1:
                raise CacheValidationError(
                    f"read needs sequences of equal length in layer {layer}; got lengths {sorted(lengths)}"
                )
            length = lengths.pop()
            if self.pool is None or length == 0:
                raise CacheValidationError(f"layer {layer} of sequences {list(seq_ids)} holds no tokens yet")
            dense = self.pool.dense(layer)
            num_blocks = blocks_needed(length, self.block_size)
            flat_shape = (len(tables), num_blocks * self.block_size, *dense.keys.shape[-2:])
            if tables[0].layer_sealed[layer] == 0 and dense.keys.dtype == self.model_dtype:
                _, run = self._block_rows(seq_ids, 0, num_blocks)
                if run is not None:  # zero-copy: the blocks are consecutive in the pool
                    keys, values = (t[run : run + num_blocks].view(flat_shape) for t in (dense.keys, dense.values))
                    return keys[:, :length].transpose(1, 2), values[:, :length].transpose(1, 2)
            shape = (len(tables), num_blocks, self.block_size, *dense.keys.shape[-2:])
            key_out, value_out = (buffer.view(shape) for buffer in self._workspace(math.prod(shape)))
            sealed = {t.layer_sealed[layer] // self.block_size for t in tables}
            if len(sealed) == 1:
                self._gather(seq_ids, layer, (sealed.pop(), num_blocks), (key_out, value_out))
            else:  # rows sealed to different depths (after uneven truncation): one row at a time
                for row, (seq_id, table) in enumerate(zip(seq_ids, tables, strict=True)):
                    span = (table.layer_sealed[layer] // self.block_size, num_blocks)
                    self._gather([seq_id], layer, span, (key_out[row : row + 1], value_out[row : row + 1]))
            keys = key_out.view(flat_shape)[:, :length].transpose(1, 2)
            values = value_out.view(flat_shape)[:, :length].transpose(1, 2)
            return keys, values

    def block_table_tensor(
        self, seq_ids: Sequence[int], first: int, count: int, quantized: bool = False
    ) -> torch.Tensor:
        """`[batch, count]` int64 ids of logical blocks `[first, first + count)` (cached until a table changes).

        `quantized` picks the sealed blocks (`quantized_ids`) instead of the full-precision ones.
        """
        return self._block_rows(seq_ids, first, count, quantized)[0]

    def _block_rows(
        self, seq_ids: Sequence[int], first: int, count: int, quantized: bool = False
    ) -> tuple[torch.Tensor, int | None]:
        """`block_table_tensor`, and the first id when the batch is one row of consecutive ids (else None)."""
        with self._lock:
            key = (tuple(seq_ids), first, count, quantized)
            cached = self._table_cache.get(key)
            if cached is not None and cached[0] == self._version:
                return cached[1], cached[2]
            tables = [self._table(s) for s in seq_ids]
            if quantized:
                rows = [t.quantized_ids[first : first + count] for t in tables]
            else:
                rows = [[t.dense_blocks[logical] for logical in range(first, first + count)] for t in tables]
            assert self.pool is not None
            tensor = torch.tensor(rows, dtype=torch.long, device=self.pool.device)
            row = rows[0]
            run = row[0] if len(rows) == 1 and row and row == list(range(row[0], row[0] + count)) else None
            if len(self._table_cache) > 64:
                self._table_cache.clear()
            self._table_cache[key] = (self._version, tensor, run)
            return tensor, run

    # ------------------------------------------------------------------------------------------ invariants
    def check_invariants(self) -> None:
        """Raise `CacheError` if a block leaked, is double-counted, or a table does not cover its tokens."""
        with self._lock:
            if self.pool is None:
                return
            self.pool.check_invariants(t.block_ids for t in self._tables.values())
            if self.quantized_pool is not None:
                self.quantized_pool.check_invariants(t.quantized_ids for t in self._tables.values())
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

    def _check_capacity(self, tables: list[BlockTable], plans: list[WritePlan], seals: list[SealBatch]) -> None:
        """Raise `CacheMemoryError`, before anything changes, if the pools cannot hold what `plans` need."""
        pool = self.pool
        assert pool is not None
        for plan in plans:
            if plan.end > self.config.max_tokens:
                raise CacheMemoryError(
                    f"a sequence would hold {plan.end} tokens but max_tokens={self.config.max_tokens}; raise max_tokens"
                )
        shared = [
            [b for b in (t.dense_blocks[x] for x in p.overwritten) if pool.ref_count(b) > 1]
            for t, p in zip(tables, plans, strict=True)
        ]
        dense_needed = sum(len(p.new_dense) for p in plans) + _copies_needed(pool, shared)
        sealed_needed = sum(p.new_sealed for p in plans)
        for target, needed, freed in (
            (pool, dense_needed, self.sealer.released_by(tables, seals) if self.sealer else 0),
            (self.quantized_pool, sealed_needed, 0),
        ):
            if target is not None and needed > target.num_free + freed:
                raise CacheMemoryError(
                    f"requested {needed} blocks but only {target.num_free + freed} of {target.num_blocks} are free "
                    f"({self.block_size} tokens each); raise {target.capacity_hint}, or free or shorten sequences"
                )

    def _allocate_dense(self, tables: list[BlockTable], plans: list[WritePlan]) -> None:
        """Give each table the full-precision blocks its plan writes: new ones, and private copies of shared ones."""
        pool = self.pool
        assert pool is not None
        for table, plan in zip(tables, plans, strict=True):
            if plan.new_dense:
                table.dense_blocks.update(zip(plan.new_dense, pool.allocate(len(plan.new_dense)), strict=True))
                self._version += 1
            for logical in plan.overwritten:
                old = table.dense_blocks[logical]
                if pool.ref_count(old) > 1:  # copy-on-write; the last holder keeps the block
                    (table.dense_blocks[logical],) = pool.allocate(1)
                    pool.copy_block(old, table.dense_blocks[logical])
                    pool.release([old])
                    self._version += 1

    def _gather(
        self,
        seq_ids: Sequence[int],
        layer: int,
        span: tuple[int, int],
        out: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Fill `out` (`[batch, num_blocks, block_size, kv_heads, head_dim]`, model dtype) with logical blocks
        `[0, num_blocks)`: the first `sealed` dequantized, the rest copied from the full-precision tail."""
        assert self.pool is not None
        sealed, num_blocks = span
        batch = len(seq_ids)
        if sealed and self.quantized_pool is not None:
            ids = self.block_table_tensor(seq_ids, 0, sealed, quantized=True).flatten()
            for target, blocks in zip(out, self.quantized_pool.quantized(layer).read(ids), strict=True):
                target[:, :sealed].copy_(blocks.view(batch, sealed, *blocks.shape[1:]))
        if num_blocks == sealed:
            return
        dense = self.pool.dense(layer)
        ids = self.block_table_tensor(seq_ids, sealed, num_blocks - sealed).flatten()
        if sealed == 0 and dense.keys.dtype == out[0].dtype:  # gather straight into the workspace
            for target, storage in zip(out, (dense.keys, dense.values), strict=True):
                torch.index_select(storage, 0, ids, out=target.view(-1, *storage.shape[1:]))
            return
        for target, blocks in zip(out, dense.read(ids), strict=True):
            target[:, sealed:].copy_(blocks.view(batch, num_blocks - sealed, *blocks.shape[1:]))

    def _release_sealed(self, table: BlockTable) -> None:
        """Release full-precision blocks that every layer has sealed."""
        lowest = min(table.layer_sealed) // self.block_size
        done = [logical for logical in table.dense_blocks if logical < lowest]
        if done and self.pool is not None:
            self.pool.release(table.dense_blocks.pop(logical) for logical in done)
            self._version += 1

    def _workspace(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two flat buffers of at least `numel` elements for `read`, grown geometrically and then reused."""
        if self._read_buffers is None or self._read_buffers[0].numel() < numel:
            assert self.pool is not None and self.model_dtype is not None
            capacity = max(numel, 2 * self._read_buffers[0].numel() if self._read_buffers else 0)
            self._read_buffers = tuple(  # type: ignore[assignment]
                torch.empty(capacity, dtype=self.model_dtype, device=self.pool.device) for _ in range(2)
            )
        assert self._read_buffers is not None
        return self._read_buffers[0][:numel], self._read_buffers[1][:numel]

    def validate_inputs(
        self, seq_ids: Sequence[int] | None, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Raise `CacheValidationError` unless `append(seq_ids, layer, key, value)` would accept these inputs.

        `seq_ids=None` checks everything but the batch size.
        """
        if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
            got = f"{type(key).__name__}, {type(value).__name__}"
            raise CacheValidationError(f"key and value must be tensors; got {got}")
        if key.dim() != 4:
            raise CacheValidationError(
                f"key has shape {tuple(key.shape)}; expected 4 dims [batch, kv_heads, tokens, head_dim]"
            )
        if value.shape != key.shape:
            raise CacheValidationError(f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
        if seq_ids is not None and key.shape[0] != len(seq_ids):
            raise CacheValidationError(f"key has batch {key.shape[0]} but {len(seq_ids)} sequence ids were given")
        if not 0 <= layer < self.num_layers:
            raise CacheValidationError(f"layer={layer} is out of range; this cache has {self.num_layers} layers")
        if key.dtype not in _FLOAT_DTYPES or value.dtype != key.dtype:
            raise CacheValidationError(
                f"key/value dtypes are {key.dtype}/{value.dtype}; expected one of float32, float16, bfloat16, "
                "the same for both"
            )
        finite_checked = self.layer_bits is not None and self.config.check_finite
        if finite_checked and not bool(torch.isfinite(key).all() & torch.isfinite(value).all()):
            raise CacheValidationError(
                "key/value hold NaN or Inf; a quantized cache refuses them (they would poison a block's "
                "scales). Fix the model's numerics, or set check_finite=False to skip this check"
            )
        pool = self.pool
        if pool is None:
            if self.config.device != "auto" and key.device != self.config.resolved_device():
                raise CacheValidationError(f"key is on {key.device} but the config sets device={self.config.device!r}")
            return
        fmt = pool.block_format
        if key.shape[1] != fmt.kv_heads or key.shape[3] != fmt.head_dim:
            raise CacheValidationError(
                f"key has {key.shape[1]} KV heads x head_dim {key.shape[3]}; this cache holds "
                f"{fmt.kv_heads} KV heads x head_dim {fmt.head_dim}"
            )
        if key.dtype != self.model_dtype:
            raise CacheValidationError(f"key dtype is {key.dtype}; this cache was filled with {self.model_dtype}")
        if key.device != pool.device or value.device != pool.device:
            raise CacheValidationError(
                f"key/value are on {key.device}/{value.device}; this cache lives on {pool.device}"
            )


def _copies_needed(pool: BlockPool, shared: list[list[int]]) -> int:
    """Blocks copy-on-write will allocate: a block with r holders, k of them writing now, needs k copies if
    r > k, else k - 1 (the last writer keeps it)."""
    writers: dict[int, int] = {}
    for block_ids in shared:
        for block_id in block_ids:
            writers[block_id] = writers.get(block_id, 0) + 1
    return sum(k if pool.ref_count(b) > k else k - 1 for b, k in writers.items())
