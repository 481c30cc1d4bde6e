"""`AttentionMass`: the attention each held token of each sequence has received, and token compaction.

Token eviction by LFU or Adaptive (accumulated attention as frequency, H2O-style) needs, per sequence, layer and KV
head, the softmax weight every held token has received so far. It is sequence state, not block state: two beams
that share blocks copy-on-write receive different attention, so each sequence keeps its own scores (forking
copies them, a few floats per token, while the blocks stay shared).

    mass[seq][layer]   [kv_heads, capacity] fp32; the first `held` columns are the held tokens, in cache order

Compaction is split the same way as every store write (see `kv_store`): `kept_tokens` gathers (allocates, reads
only), `compact` writes in place; the batched `AttentionMass` methods change all rows or none, since their
allocations (room, fp32 copies, gathers) come before their writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kv_cache.block_table import BlockTable, blocks_needed


def token_slots(table: BlockTable, length: int, block_size: int, device: torch.device) -> torch.Tensor:
    """`[length]` int64 slots (block id * block_size + offset) of a table's first `length` full-precision tokens."""
    ids = torch.tensor([table.dense_blocks[x] for x in range(blocks_needed(length, block_size))], dtype=torch.long)
    offsets = torch.arange(block_size)
    return (ids[:, None] * block_size + offsets).flatten()[:length].to(device)


def kept_tokens(storages: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], keep: torch.Tensor) -> list[Tensor]:
    """The tokens each row keeps, gathered (reads only): per storage `[batch * kept, kv_heads, ...]`, row `b`'s
    `i`-th kept token at `b * kept + i`, each KV head its own tokens.

    storages: per-slot tensors `[num_slots, kv_heads, ...]` (keys, values); sources: per row `[length]` int64,
    the row's slots in token order; keep: `[batch, kv_heads, kept]` int64 token indices, ascending per head.
    """
    device = storages[0].device
    keep = keep.to(device)
    heads = torch.arange(keep.shape[1], device=device)
    slots = torch.cat([row_slots[row_keep].T for row_slots, row_keep in zip(sources, keep, strict=True)])
    return [storage[slots, heads] for storage in storages]  # slots: [batch * kept, kv_heads]


def compact(storages: Sequence[torch.Tensor], targets: torch.Tensor, kept: Sequence[torch.Tensor]) -> None:
    """Write `kept_tokens` output into slots `targets` `[batch * kept]` int64 (each row's first `kept` slots, in
    token order): in place, allocating nothing. Afterwards a row's i-th slot holds, per head, its i-th kept token."""
    for storage, tokens in zip(storages, kept, strict=True):
        storage.index_copy_(0, targets, tokens)


class AttentionMass:
    """Accumulated attention per held token, per sequence and layer (capacity grows by doubling)."""

    def __init__(self, num_layers: int, kv_heads: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.device = device
        self._mass: dict[int, list[torch.Tensor]] = {}
        self._held: dict[int, list[int]] = {}

    def reserve(self, seq_ids: Sequence[int], layer: int, count: int) -> None:
        """Make room for `count` more tokens of `layer` in each sequence, so that `grow` allocates nothing; no
        score changes (a full row moves to a tensor twice as large)."""
        for seq_id in seq_ids:
            layers, held = self._entry(seq_id)
            needed = held[layer] + count
            if needed > layers[layer].shape[1]:
                bigger = self._empty(max(needed, 2 * layers[layer].shape[1]))
                bigger[:, : held[layer]] = layers[layer][:, : held[layer]]
                layers[layer] = bigger

    def grow(self, seq_ids: Sequence[int], layer: int, count: int) -> None:
        """`count` new tokens were appended to `layer` of each sequence: they have received no attention yet.

        All rows or none: the room is made first (nothing to do after `reserve`), then the new scores are zeroed.
        """
        self.reserve(seq_ids, layer, count)
        for seq_id in seq_ids:
            layers, held = self._entry(seq_id)
            layers[layer][:, held[layer] : held[layer] + count] = 0
            held[layer] += count

    def add(self, seq_ids: Sequence[int], layer: int, mass: torch.Tensor) -> None:
        """Add `mass` `[batch, kv_heads, tokens]` (tokens = held; any float dtype) to each row's held tokens.

        All rows or none: the fp32 copy is made first, then the sums are added in place.
        """
        mass = mass.float()
        entries = [self._entry(seq_id) for seq_id in seq_ids]
        for row, (layers, held) in enumerate(entries):
            layers[layer][:, : held[layer]] += mass[row, :, : held[layer]]

    def read(self, seq_id: int, layer: int) -> torch.Tensor:
        """`[kv_heads, held]` fp32."""
        layers, held = self._entry(seq_id)
        return layers[layer][:, : held[layer]]

    def keep(self, seq_ids: Sequence[int], layer: int, keep: torch.Tensor) -> None:
        """Keep, per row and head, the tokens `keep` `[batch, kv_heads, kept]` (ascending), as `compact` does to
        the blocks. All rows or none: every row's kept scores are gathered before any is written."""
        kept = keep.shape[-1]
        keep = keep.to(self.device)
        scores = [self.read(seq_id, layer).gather(1, row) for seq_id, row in zip(seq_ids, keep, strict=True)]
        for seq_id, row_scores in zip(seq_ids, scores, strict=True):
            layers, held = self._entry(seq_id)
            layers[layer][:, :kept].copy_(row_scores)
            held[layer] = kept

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        if seq_id in self._held:
            self._held[seq_id] = [min(held, num_tokens) for held in self._held[seq_id]]

    def fork(self, source: int, target: int) -> None:
        """`target` starts with a copy of `source`'s scores (nothing changes unless the copies succeed)."""
        if source in self._mass:
            self._mass[target] = [mass.clone() for mass in self._mass[source]]
            self._held[target] = list(self._held[source])

    def drop(self, seq_id: int) -> None:
        self._mass.pop(seq_id, None)
        self._held.pop(seq_id, None)

    def _entry(self, seq_id: int) -> tuple[list[torch.Tensor], list[int]]:
        """A sequence's per-layer scores and held counts (created empty on first use)."""
        if seq_id not in self._mass:
            self._mass[seq_id] = [self._empty(0) for _ in range(self.num_layers)]
            self._held[seq_id] = [0] * self.num_layers
        return self._mass[seq_id], self._held[seq_id]

    def _empty(self, capacity: int) -> torch.Tensor:
        return torch.zeros(self.kv_heads, capacity, device=self.device)
