"""`KVStore`: the block tables of many sequences over one `BlockPool`.

It is the one place that writes and reads a sequence's tokens: `append` finds (or allocates) the slots for new
tokens and copies them in, `read` gathers what attention needs, `fork` shares every block with a new sequence,
and a write into a shared block first copies it (copy-on-write). Every public method takes the store's lock, so
threads may share one store.

Inputs and outputs use Hugging Face's layout: `[batch, kv_heads, tokens, head_dim]`, one row per sequence id.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

import torch

from kv_cache.block_format import BlockFormat
from kv_cache.block_pool import BlockPool
from kv_cache.block_table import BlockTable, blocks_needed
from kv_cache.config import CacheMode, KVCacheConfig
from kv_cache.errors import CacheMemoryError, CacheValidationError

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KVStore:
    """Sequences of key/value tokens for `num_layers` layers, stored in blocks of one preallocated pool.

    The pool is created by `initialize`, or lazily by the first `append` from the shapes it sees.
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
        self.pool: BlockPool | None = None
        self.model_dtype: torch.dtype | None = None
        self._tables: dict[int, BlockTable] = {}
        self._next_id = 0
        self._lock = threading.RLock()
        self._version = 0  # bumped whenever a block id list changes; keys the block-table tensor cache
        self._table_cache: dict[tuple[tuple[int, ...], int], tuple[int, torch.Tensor]] = {}
        self._read_buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------------- setup
    def initialize(
        self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, batch_size: int
    ) -> None:
        """Allocate the pool for tokens of `kv_heads` x `head_dim` in `dtype` on `device`.

        Without `num_blocks` or `memory_budget_mb` in the config, the pool holds `batch_size` sequences of
        `max_tokens` tokens, plus one spare block per sequence for copy-on-write.
        """
        with self._lock:
            if self.pool is not None:
                return
            config = self.config
            fmt = BlockFormat(config.block_size, self.num_layers, kv_heads, head_dim, config.dtype or dtype)
            if config.num_blocks is not None:
                num_blocks, hint = config.num_blocks, "num_blocks"
            elif config.memory_budget_mb is not None:
                num_blocks, hint = int(config.memory_budget_mb * 2**20 // fmt.bytes_per_block), "memory_budget_mb"
                if num_blocks < 1:
                    raise CacheMemoryError(
                        f"memory_budget_mb={config.memory_budget_mb} holds no block of {fmt.describe()}; "
                        f"raise memory_budget_mb to at least {fmt.bytes_per_block / 2**20:.3f}"
                    )
            else:
                num_blocks = batch_size * (config.blocks_per_sequence + 1)
                hint = "num_blocks (or max_tokens)"
            self.pool = BlockPool(fmt, num_blocks, device, capacity_hint=hint)
            self.model_dtype = dtype

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
            new_id = self._next_id
            self._next_id += 1
            self._tables[new_id] = table
            return new_id

    def free(self, seq_id: int) -> None:
        """Forget a sequence and release its blocks."""
        with self._lock:
            table = self._table(seq_id)
            del self._tables[seq_id]
            if self.pool is not None and table.block_ids:
                self.pool.release(table.block_ids)
                self._version += 1

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens of a sequence (in every layer) and release emptied blocks."""
        with self._lock:
            if num_tokens < 0:
                raise CacheValidationError(f"num_tokens={num_tokens} must be >= 0")
            table = self._table(seq_id)
            table.layer_lengths = [min(length, num_tokens) for length in table.layer_lengths]
            keep = blocks_needed(table.num_tokens, self.config.block_size)
            if self.pool is not None and len(table.block_ids) > keep:
                self.pool.release(table.block_ids[keep:])
                del table.block_ids[keep:]
                self._version += 1

    def reset(self) -> None:
        """Free every sequence (the pool stays allocated)."""
        with self._lock:
            for seq_id in list(self._tables):
                self.free(seq_id)

    def num_tokens(self, seq_id: int, layer: int | None = None) -> int:
        """Tokens of a sequence in `layer` (or the furthest any layer has written)."""
        with self._lock:
            table = self._table(seq_id)
            return table.num_tokens if layer is None else table.layer_lengths[layer]

    def block_ids(self, seq_id: int) -> list[int]:
        with self._lock:
            return list(self._table(seq_id).block_ids)

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
            pool = self.pool
            assert pool is not None
            tables = [self._table(s) for s in seq_ids]
            count = key.shape[2]
            if count == 0:
                return
            self._make_writable(tables, layer, count)
            block_size = self.config.block_size
            start = tables[0].layer_lengths[layer]
            if len(tables) == 1 and start // block_size == (start + count - 1) // block_size:
                # One run inside one block: a single contiguous copy, no index tensor.
                slot = tables[0].block_ids[start // block_size] * block_size + start % block_size
                pool.key_slots[layer].narrow(0, slot, count).copy_(key[0].transpose(0, 1))
                pool.value_slots[layer].narrow(0, slot, count).copy_(value[0].transpose(0, 1))
            else:
                slots = torch.tensor(self._slots(tables, layer, count), device=key.device)
                rows = key.shape[0] * count
                flat_key = key.transpose(1, 2).reshape(rows, key.shape[1], key.shape[3])
                flat_value = value.transpose(1, 2).reshape(rows, key.shape[1], key.shape[3])
                pool.key_slots[layer].index_copy_(0, slots, flat_key.to(pool.keys.dtype))
                pool.value_slots[layer].index_copy_(0, slots, flat_value.to(pool.values.dtype))
            for table in tables:
                table.layer_lengths[layer] += count

    def read(self, seq_ids: Sequence[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the sequences in `layer`, oldest first, for attention.

        All sequences must hold the same number of tokens in `layer`. Returns two `[batch, kv_heads, tokens,
        head_dim]` tensors in the model's dtype. They are views of one workspace that the next `read` (of any
        layer) overwrites, the way attention consumes them: clone them to keep them.
        """
        with self._lock:
            tables = [self._table(s) for s in seq_ids]
            lengths = {t.layer_lengths[layer] for t in tables}
            if len(lengths) != 1:
                raise CacheValidationError(
                    f"read needs sequences of equal length in layer {layer}; got {sorted(lengths)}"
                )
            length = lengths.pop()
            pool = self.pool
            if pool is None or length == 0:
                raise CacheValidationError(f"layer {layer} of sequences {list(seq_ids)} holds no tokens yet")
            num_blocks = blocks_needed(length, self.config.block_size)
            table = self.block_table_tensor(seq_ids, num_blocks).flatten()
            gathered = (table.numel(), *pool.keys.shape[2:])
            key_out, value_out = self._workspace(gathered[0] * pool.keys[0, 0].numel())
            torch.index_select(pool.keys[layer], 0, table, out=key_out.view(gathered))
            torch.index_select(pool.values[layer], 0, table, out=value_out.view(gathered))
            shape = (len(tables), num_blocks * self.config.block_size, *pool.keys.shape[-2:])
            keys = key_out.view(shape)[:, :length].transpose(1, 2)
            values = value_out.view(shape)[:, :length].transpose(1, 2)
            if keys.dtype != self.model_dtype:
                keys, values = keys.to(self.model_dtype), values.to(self.model_dtype)
            return keys, values

    def block_table_tensor(self, seq_ids: Sequence[int], num_blocks: int) -> torch.Tensor:
        """`[batch, num_blocks]` int64 block ids on the pool's device (cached until a table changes)."""
        with self._lock:
            key = (tuple(seq_ids), num_blocks)
            cached = self._table_cache.get(key)
            if cached is not None and cached[0] == self._version:
                return cached[1]
            assert self.pool is not None
            rows = [self._table(s).block_ids[:num_blocks] for s in seq_ids]
            tensor = torch.tensor(rows, dtype=torch.long, device=self.pool.keys.device)
            if len(self._table_cache) > 64:
                self._table_cache.clear()
            self._table_cache[key] = (self._version, tensor)
            return tensor

    # ------------------------------------------------------------------------------------------ invariants
    def check_invariants(self) -> None:
        """Raise `CacheError` if a block leaked, is double-counted, or a table is shorter than its tokens."""
        with self._lock:
            if self.pool is None:
                return
            self.pool.check_invariants(t.block_ids for t in self._tables.values())
            for seq_id, table in self._tables.items():
                if len(table.block_ids) != blocks_needed(table.num_tokens, self.config.block_size):
                    raise CacheValidationError(
                        f"sequence {seq_id}: {len(table.block_ids)} blocks for {table.num_tokens} tokens"
                    )

    # ----------------------------------------------------------------------------------------------- inner
    def _table(self, seq_id: int) -> BlockTable:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise CacheValidationError(f"sequence id {seq_id!r} is not in this cache") from None

    def _workspace(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two flat buffers of at least `numel` elements for `read`, grown geometrically and then reused."""
        pool = self.pool
        assert pool is not None
        if self._read_buffers is None or self._read_buffers[0].numel() < numel:
            capacity = max(numel, 2 * self._read_buffers[0].numel() if self._read_buffers else 0)
            make = lambda: torch.empty(capacity, dtype=pool.keys.dtype, device=pool.keys.device)  # noqa: E731
            self._read_buffers = (make(), make())
        return self._read_buffers[0][:numel], self._read_buffers[1][:numel]

    def _slots(self, tables: list[BlockTable], layer: int, count: int) -> list[int]:
        block_size = self.config.block_size
        slots: list[int] = []
        for table in tables:
            ids = table.block_ids
            start = table.layer_lengths[layer]
            slots.extend(ids[t // block_size] * block_size + t % block_size for t in range(start, start + count))
        return slots

    def _make_writable(self, tables: list[BlockTable], layer: int, count: int) -> None:
        """Give each table private blocks for its next `count` tokens in `layer`: grow, and copy shared blocks.

        Counts everything first and raises `CacheMemoryError` before changing anything if the pool is short.
        """
        pool = self.pool
        assert pool is not None
        block_size = self.config.block_size
        grow = 0
        shared_writes: Counter[int] | None = None
        for table in tables:
            start = table.layer_lengths[layer]
            end = start + count
            if end > self.config.max_tokens:
                raise CacheMemoryError(
                    f"a sequence would hold {end} tokens but max_tokens={self.config.max_tokens}; raise max_tokens"
                )
            need = blocks_needed(end, block_size)
            grow += max(0, need - len(table.block_ids))
            for block_id in table.block_ids[start // block_size : need]:
                if pool.ref_count(block_id) > 1:
                    shared_writes = shared_writes or Counter()
                    shared_writes[block_id] += 1
        # A block with r holders, k of them writing now, needs k copies (r > k) or k - 1 (the last writer keeps it).
        copies = 0
        if shared_writes:
            copies = sum(k if pool.ref_count(b) > k else k - 1 for b, k in shared_writes.items())
        if grow + copies > pool.num_free:
            raise CacheMemoryError(
                f"requested {grow + copies} blocks but only {pool.num_free} of {pool.num_blocks} are free "
                f"({block_size} tokens each); raise {pool.capacity_hint}, or free or shorten sequences"
            )
        if grow == 0 and copies == 0:
            return
        self._version += 1
        for table in tables:
            need = blocks_needed(table.layer_lengths[layer] + count, block_size)
            if need > len(table.block_ids):
                table.block_ids.extend(pool.allocate(need - len(table.block_ids)))
            first = table.layer_lengths[layer] // block_size
            for index in range(first, need):
                old = table.block_ids[index]
                if pool.ref_count(old) > 1:
                    (new,) = pool.allocate(1)
                    pool.copy_block(old, new)
                    pool.release([old])
                    table.block_ids[index] = new

    def validate_inputs(
        self, seq_ids: Sequence[int] | None, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Raise `CacheValidationError` unless `append(seq_ids, layer, key, value)` would accept these inputs.

        `seq_ids=None` checks everything but the batch size.
        """
        if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
            raise CacheValidationError(
                f"key and value must be tensors; got {type(key).__name__}, {type(value).__name__}"
            )
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
        pool = self.pool
        if pool is None:
            if self.config.device != "auto" and key.device != self.config.resolved_device():
                raise CacheValidationError(f"key is on {key.device} but the config sets device={self.config.device!r}")
            return
        _, _, _, kv_heads, head_dim = pool.keys.shape
        if key.shape[1] != kv_heads or key.shape[3] != head_dim:
            raise CacheValidationError(
                f"key has {key.shape[1]} KV heads x head_dim {key.shape[3]}; this cache holds "
                f"{kv_heads} KV heads x head_dim {head_dim}"
            )
        if key.dtype != self.model_dtype:
            raise CacheValidationError(f"key dtype is {key.dtype}; this cache was filled with {self.model_dtype}")
        if key.device != pool.keys.device or value.device != pool.keys.device:
            raise CacheValidationError(
                f"key/value are on {key.device}/{value.device}; this cache lives on {pool.keys.device}"
            )
