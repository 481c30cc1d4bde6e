"""`Sealer`: turns the oldest full-precision tail blocks of a sequence into quantized blocks, and back.

With quantization a sequence's newest `residual_tokens` tokens (or up to a block more) stay in full precision;
each time a layer's tail grows a whole block past that window, the block is *sealed*: quantized from the tail's
tokens and the new ones, written to a quantized block (ids shared by all layers, allocated by the first layer to
seal it), and its full-precision block released once every layer has sealed it. When layer 0 seals blocks that
the other layers already hold whole (they were in the tail before this step), those are sealed in every layer at
once, so a long chunk never holds the old and the new tail in full precision together.

Sealing runs in three steps so that a failing allocation changes nothing: `encode` quantizes (reads only),
`assign` allocates the quantized blocks and advances the tables (undone by the store if a later step fails),
`write` stores the encoded blocks in place (allocates nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kv_cache.block_format import QuantizedBlocks
from kv_cache.block_io import TokenRows, gather_sealed, sealed_block_ids
from kv_cache.block_pool import BlockPool
from kv_cache.block_table import BlockTable, SealBatch, WritePlan, plan_append
from kv_cache.errors import CacheMemoryError, CacheValidationError
from kv_cache.quantizer import stats_finite


class Sealer:
    """Seals tail blocks of `pool` (full precision) into `quantized_pool`, keeping `residual_tokens` exact."""

    def __init__(self, pool: BlockPool, quantized_pool: BlockPool, residual_tokens: int) -> None:
        self.pool = pool
        self.quantized_pool = quantized_pool
        self.residual_tokens = residual_tokens
        self.block_size = pool.block_size
        self.num_layers = pool.block_format.num_layers

    def target(self, table: BlockTable, layer: int, count: int) -> int:
        """Tokens `layer` holds sealed after `count` more: every whole block older than the window."""
        end = table.layer_lengths[layer] + count
        full_blocks = (end - self.residual_tokens) // self.block_size
        return max(table.layer_sealed[layer], full_blocks * self.block_size)

    def plan(self, tables: list[BlockTable], plans: list[WritePlan], layer: int) -> list[SealBatch]:
        """What to seal now: the plans of `layer` that seal, then, per other layer, the blocks `layer` seals
        that the other layer already holds whole."""
        rows = [i for i, p in enumerate(plans) if p.seal_to > p.sealed]
        if not rows:
            return []
        sealing = [(tables[i], plans[i]) for i in rows]
        seals = [SealBatch(layer, [t for t, _ in sealing], [p for _, p in sealing], rows)]
        for other in range(self.num_layers):
            if other == layer:
                continue
            todo = []
            for table, plan in sealing:
                target = min(plan.seal_to, table.layer_lengths[other] // self.block_size * self.block_size)
                if target > table.layer_sealed[other]:
                    todo.append((table, plan_append(table, other, 0, self.block_size, target)))
            if todo:
                seals.append(SealBatch(other, [t for t, _ in todo], [p for _, p in todo]))
        return seals

    def released_by(self, tables: list[BlockTable], seals: list[SealBatch]) -> int:
        """Full-precision blocks that `seals` will free (every layer sealed them, no other holder)."""
        sealed_to = {
            (id(t), seal.layer): p.seal_to for seal in seals for t, p in zip(seal.tables, seal.plans, strict=True)
        }
        released = 0
        for table in tables:
            lowest = min(sealed_to.get((id(table), i), now) for i, now in enumerate(table.layer_sealed))
            released += sum(
                1
                for logical, block in table.dense_blocks.items()
                if logical < lowest // self.block_size and self.pool.ref_count(block) == 1
            )
        return released

    def shared_writes(self, seals: list[SealBatch]) -> list[list[int]]:
        """Per table, the existing sealed blocks `seals` write while another sequence shares them (a layer ran
        ahead and allocated the block, then the sequence was forked): those are copied first."""
        written: dict[int, tuple[BlockTable, set[int]]] = {}
        for seal in seals:
            for table, plan in zip(seal.tables, seal.plans, strict=True):
                logicals = range(
                    plan.sealed // self.block_size, min(len(table.quantized_ids), plan.seal_to // self.block_size)
                )
                written.setdefault(id(table), (table, set()))[1].update(logicals)
        pool = self.quantized_pool
        return [
            [table.quantized_ids[x] for x in sorted(logicals) if pool.ref_count(table.quantized_ids[x]) > 1]
            for table, logicals in written.values()
        ]

    def encode(self, seals: list[SealBatch], rows: TokenRows | None) -> list[tuple[torch.Tensor, ...]]:
        """Quantize every batch in `seals` (the new `rows`, if given, feed the batch that has `rows`): reads blocks,
        changes nothing, so a block that cannot be sealed (NaN/Inf) or a failing allocation raises before anything
        does.

        The layers' blocks are quantized together, one call per bit width (quantization is per block, so this is
        exactly the per-layer result), and their scales and zeros checked with one device sync.
        """
        memo: dict = {}  # every layer sealing the same blocks shares the index tensors
        gathered = [
            gather_sealed(self.pool.dense(seal.layer), seal, rows if seal.rows is not None else None, memo)
            for seal in seals
        ]
        by_bits: dict[int, list[int]] = {}
        for index, seal in enumerate(seals):
            by_bits.setdefault(self.quantized_pool.quantized(seal.layer).bits, []).append(index)
        encoded: list[tuple[torch.Tensor, ...]] = [() for _ in seals]
        for indices in by_bits.values():
            storage = self.quantized_pool.quantized(seals[indices[0]].layer)
            keys = torch.cat([gathered[i][0] for i in indices])
            values = torch.cat([gathered[i][1] for i in indices])
            counts = [gathered[i][0].shape[0] for i in indices]
            parts = [part.split(counts) for part in storage.encode(keys, values, check=False)]
            for position, index in enumerate(indices):
                encoded[index] = tuple(part[position] for part in parts)
        if not stats_finite([stats for blocks in encoded for stats in (blocks[1], blocks[2], blocks[4], blocks[5])]):
            for seal, (keys, values) in zip(seals, gathered, strict=True):  # find the culprit, word the error
                self.quantized_pool.quantized(seal.layer).encode(keys, values, check=True)
        return encoded

    def assign(self, seals: list[SealBatch], encoded: list[tuple[torch.Tensor, ...]]) -> SealWrites:
        """Give the seals their quantized blocks (ids shared by all layers: allocated by the first layer to seal
        them; copied first where another sequence shares a half-sealed one) and advance each layer's sealed length.

        Table and allocator changes only (run it inside the pools' `atomic`); the returned writes store the data.
        """
        pool = self.quantized_pool
        writes = SealWrites([], [])
        for seal, blocks in zip(seals, encoded, strict=True):
            for table, plan in zip(seal.tables, seal.plans, strict=True):
                first, end = plan.sealed // self.block_size, plan.seal_to // self.block_size
                for logical in range(first, min(end, len(table.quantized_ids))):
                    old = table.quantized_ids[logical]
                    if pool.ref_count(old) > 1:  # copy-on-write: another sequence shares this half-sealed block
                        (table.quantized_ids[logical],) = pool.allocate(1)
                        writes.copies.append((old, table.quantized_ids[logical]))
                        pool.release([old])
                missing = end - len(table.quantized_ids)
                if missing > 0:
                    table.quantized_ids.extend(pool.allocate(missing))
                table.layer_sealed[seal.layer] = plan.seal_to
            block_ids = sealed_block_ids(seal.tables, seal.plans, self.block_size, pool.device)
            writes.stores.append((pool.quantized(seal.layer), block_ids, blocks))
        return writes

    def write(self, writes: SealWrites) -> None:
        """Store what `assign` prepared: the copy-on-write copies, then the encoded blocks (in place)."""
        self.quantized_pool.copy_blocks(writes.copies)
        for storage, block_ids, encoded in writes.stores:
            storage.store(block_ids, encoded)

    def unseal(self, table: BlockTable, num_tokens: int) -> None:
        """Cut a sequence inside its sealed blocks: dequantize the kept part of the cut block into the tail.

        The cut block is dequantized before anything changes; then the tables and pools change and the block is
        written (in place), so running out of memory leaves the sequence as it was.
        """
        if len(set(table.layer_sealed)) != 1 or len(set(table.layer_lengths)) != 1:
            raise CacheValidationError("truncating into sealed blocks needs every layer at the same length")
        cut, partial = divmod(num_tokens, self.block_size)
        if partial and not table.dense_blocks and not self.pool.can_allocate(1):
            raise CacheMemoryError(f"truncate needs 1 free block but none is free; raise {self.pool.capacity_hint}")
        restored = []  # per layer: the cut block's keys and values, [1, block_size, kv_heads, head_dim] fp32
        if partial:
            source = torch.tensor([table.quantized_ids[cut]], device=self.pool.device)
            restored = [self.quantized_pool.quantized(layer).read(source) for layer in range(self.num_layers)]
        self.pool.release(table.block_ids)  # every full-precision block lies after the cut
        table.dense_blocks = dict(zip([cut], self.pool.allocate(1), strict=True)) if partial else {}
        self.quantized_pool.release(table.quantized_ids[cut:])
        del table.quantized_ids[cut:]
        table.layer_sealed = [cut * self.block_size] * self.num_layers
        for layer, keys_values in enumerate(restored):
            dense = self.pool.dense(layer)
            for storage, tokens in zip((dense.keys, dense.values), keys_values, strict=True):
                storage[table.dense_blocks[cut]].copy_(tokens[0])


@dataclass
class SealWrites:
    """What sealing writes once nothing can fail: copy-on-write copies `(src, dst)` in the quantized pool, then
    per seal batch its layer's storage, `[n]` int64 block ids and encoded blocks (`QuantizedBlocks.store`)."""

    copies: list[tuple[int, int]]
    stores: list[tuple[QuantizedBlocks, torch.Tensor, tuple[torch.Tensor, ...]]]
