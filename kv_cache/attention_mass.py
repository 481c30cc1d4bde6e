"""`AttentionMass`: the attention each held token of each sequence has received, and token compaction.

Token eviction by LFU or Adaptive (accumulated attention as frequency, H2O-style) needs, per sequence, layer and KV
head, the softmax weight every held token has received so far. It is sequence state, not block state: two beams
that share blocks copy-on-write receive different attention, so each sequence keeps its own scores (forking
copies them, a few floats per token, while the blocks stay shared).

    mass[seq][layer]   [kv_heads, capacity] fp32; the first `held` columns are the held tokens, in cache order
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kv_cache.block_table import BlockTable, blocks_needed


def token_slots(table: BlockTable, length: int, block_size: int, device: torch.device) -> torch.Tensor:
    """`[length]` int64 slots (block id * block_size + offset) of a table's first `length` full-precision tokens."""
    ids = torch.tensor([table.dense_blocks[x] for x in range(blocks_needed(length, block_size))], dtype=torch.long)
    offsets = torch.arange(block_size)
    return (ids[:, None] * block_size + offsets).flatten()[:length].to(device)


def compact(storages: Sequence[torch.Tensor], slots: torch.Tensor, keep: torch.Tensor) -> None:
    """Move the tokens one row keeps to the front of its slots, each KV head its own tokens, order preserved.

    storages: per-slot tensors `[num_slots, kv_heads, ...]` (keys, values) written in place.
    slots: `[length]` int64, the row's slots in token order; keep: `[kv_heads, kept]` int64 token indices,
    ascending per head. Afterwards slot `slots[i]` holds, per head, the i-th kept token.
    """
    kept = keep.shape[-1]
    heads = torch.arange(keep.shape[0], device=slots.device)
    source = slots[keep.to(slots.device)].T  # [kept, kv_heads]: the slot of each kept token, per head
    for storage in storages:
        storage[slots[:kept]] = storage[source, heads]


class AttentionMass:
    """Accumulated attention per held token, per sequence and layer (capacity grows by doubling)."""

    def __init__(self, num_layers: int, kv_heads: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.device = device
        self._mass: dict[int, list[torch.Tensor]] = {}
        self._held: dict[int, list[int]] = {}

    def grow(self, seq_id: int, layer: int, count: int) -> None:
        """`count` new tokens were appended to `layer`: they have received no attention yet."""
        layers, held = self._entry(seq_id)
        needed = held[layer] + count
        if needed > layers[layer].shape[1]:
            bigger = self._empty(max(needed, 2 * layers[layer].shape[1]))
            bigger[:, : held[layer]] = layers[layer][:, : held[layer]]
            layers[layer] = bigger
        layers[layer][:, held[layer] : needed] = 0
        held[layer] = needed

    def add(self, seq_id: int, layer: int, mass: torch.Tensor) -> None:
        """Add `mass` `[kv_heads, tokens]` (tokens <= held; any float dtype) to the first held tokens."""
        layers, held = self._entry(seq_id)
        layers[layer][:, : held[layer]] += mass[:, : held[layer]].float()

    def read(self, seq_id: int, layer: int) -> torch.Tensor:
        """`[kv_heads, held]` fp32."""
        layers, held = self._entry(seq_id)
        return layers[layer][:, : held[layer]]

    def keep(self, seq_id: int, layer: int, keep: torch.Tensor) -> None:
        """Keep, per head, the tokens `keep` `[kv_heads, kept]` (ascending), as `compact` does to the blocks."""
        kept = keep.shape[-1]
        scores = self.read(seq_id, layer).gather(1, keep.to(self.device))
        layers, held = self._entry(seq_id)
        layers[layer][:, :kept] = scores
        held[layer] = kept

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        if seq_id in self._held:
            self._held[seq_id] = [min(held, num_tokens) for held in self._held[seq_id]]

    def fork(self, source: int, target: int) -> None:
        """`target` starts with a copy of `source`'s scores."""
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
