"""`Sealer`: turns the oldest full-precision tail blocks of a sequence into quantized blocks, and back.

With quantization a sequence's newest `residual_tokens` tokens (or up to a block more) stay in full precision;
each time a layer's tail grows a whole block past that window, the block is *sealed*: quantized from the tail's
tokens and the new ones, written to a quantized block (ids shared by all layers, allocated by the first layer to
seal it), and its full-precision block released once every layer has sealed it. When layer 0 seals blocks that
the other layers already hold whole (they were in the tail before this step), those are sealed in every layer at
once, so a long chunk never holds the old and the new tail in full precision together.

Sealing runs in three steps so that a failing allocation changes nothing: `encode` quantizes (reads only),
`assign` allocates the quantized blocks and advances the tables (undone by the store if a later step fails),
`write` stores the encoded blocks in place (allocates nothing). Both pools keep their layers in `LayerStack`s, so
the layers sealing at one bit width are gathered, quantized, checked and stored together: a handful of
operations per seal, not per layer (the host cost of a seal is what a step pays for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kv_cache.block_format import LayerStack
from kv_cache.block_io import TokenRows, gather_sealed, require_finite
from kv_cache.block_pool import BlockPool
from kv_cache.block_table import BlockTable, SealBatch, WritePlan, plan_append
from kv_cache.devices import device_tensor
from kv_cache.errors import CacheMemoryError, CacheValidationError
from kv_cache.quantizer import stats_finite


class Sealer:
    """Seals tail blocks of `pool` (full precision) into `quantized_pool`, keeping `residual_tokens` exact. Both
    pools must be stacked (`BlockPool(..., stacked=True)`)."""

    def __init__(self, pool: BlockPool, quantized_pool: BlockPool, residual_tokens: int) -> None:
        self.pool = pool
        self.quantized_pool = quantized_pool
        self.residual_tokens = residual_tokens
        self.block_size = pool.block_size
        self.num_layers = pool.block_format.num_layers
        (dense,) = pool.stacks
        self._dense_slots = (dense.tensors[0].flatten(0, 2), dense.tensors[1].flatten(0, 2))  # [layers * slots, ...]
        self._dense_first_slot = {
            layer: row * pool.num_blocks * self.block_size for row, layer in enumerate(dense.layers)
        }
        self._quantized = {
            layer: (stack, row) for stack in quantized_pool.stacks for row, layer in enumerate(stack.layers)
        }
        if len(self._dense_first_slot) != self.num_layers or len(self._quantized) != self.num_layers:
            raise CacheValidationError("a Sealer needs both pools stacked: BlockPool(..., stacked=True)")

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

    def encode(
        self, seals: list[SealBatch], rows: TokenRows | None, rows_finite: torch.Tensor | None = None
    ) -> list[EncodedSeals]:
        """Quantize every batch in `seals` (the new `rows`, if given, feed the batch that has `rows`): reads blocks,
        changes nothing, so a block that cannot be sealed (NaN/Inf) or a failing allocation raises before anything
        does.

        The layers of one bit width are gathered and quantized together (quantization is per block, so this is
        exactly the per-layer result), and all scales and zeros are checked with one device sync, together with
        `rows_finite` (the append's check of its new rows, `block_io.finite_flag`) when given.
        """
        by_bits: dict[int, list[int]] = {}
        for index, seal in enumerate(seals):
            by_bits.setdefault(self.quantized_pool.quantized(seal.layer).bits, []).append(index)
        encoded, gathered = [], []
        for indices in by_bits.values():
            parts = [(seals[i], self._dense_first_slot[seals[i].layer]) for i in indices]
            keys, values = gather_sealed(self._dense_slots, self.block_size, parts, rows)
            storage = self.quantized_pool.quantized(seals[indices[0]].layer)
            encoded.append(EncodedSeals(indices, storage.encode(keys, values, check=False)))
            gathered.append((storage, keys, values))
        flags = [] if rows_finite is None else [rows_finite]
        if not stats_finite([stats for group in encoded for stats in group.stats()], flags):
            require_finite(rows_finite)
            for storage, keys, values in gathered:  # find the culprit, word the error
                storage.encode(keys, values, check=True)
        return encoded

    def assign(self, seals: list[SealBatch], encoded: list[EncodedSeals]) -> SealWrites:
        """Give the seals their quantized blocks (ids shared by all layers: allocated by the first layer to seal
        them; copied first where another sequence shares a half-sealed one) and advance each layer's sealed length.

        Table and allocator changes only (run it inside the pools' `atomic`); the returned writes store the data.
        """
        pool = self.quantized_pool
        writes = SealWrites([], [])
        for group in encoded:
            stack = self._quantized[seals[group.indices[0]].layer][0]  # the group's bit width
            rows: list[int] = []  # in the stack's flattened blocks, in `encode`'s order
            for seal in (seals[i] for i in group.indices):
                row = self._quantized[seal.layer][1]
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
                    rows += [row * pool.num_blocks + table.quantized_ids[x] for x in range(first, end)]
            writes.stores.append((stack, device_tensor(rows, torch.long, pool.device), group.blocks))
        return writes

    def write(self, writes: SealWrites) -> None:
        """Store what `assign` prepared: the copy-on-write copies, then the encoded blocks (in place)."""
        self.quantized_pool.copy_blocks(writes.copies)
        for stack, rows, blocks in writes.stores:
            for role, new in enumerate(blocks):
                stack.flat(role).index_copy_(0, rows, new)

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
class EncodedSeals:
    """The seals `indices` (of one bit width), quantized together: `QuantizedBlocks.encode`'s six tensors over
    their blocks, seal after seal."""

    indices: list[int]
    blocks: tuple[torch.Tensor, ...]

    def stats(self) -> tuple[torch.Tensor, ...]:
        """The scales and zeros (what a NaN/Inf poisons)."""
        return self.blocks[1], self.blocks[2], self.blocks[4], self.blocks[5]


@dataclass
class SealWrites:
    """What sealing writes once nothing can fail: copy-on-write copies `(src, dst)` in the quantized pool, then
    per bit width its `LayerStack`, the `[n]` int64 rows of its flattened blocks and the encoded blocks."""

    copies: list[tuple[int, int]]
    stores: list[tuple[LayerStack, torch.Tensor, tuple[torch.Tensor, ...]]]
