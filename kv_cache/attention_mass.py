"""`AttentionMass`: the attention each held full-precision token has received, and token compaction.

Token eviction by LFU or Adaptive (accumulated attention as frequency, H2O-style) needs, per layer and KV head,
the softmax weight every cached token has received so far. It is kept per *pool slot* (`block_id * block_size +
offset`, the layout of `DenseBlocks.key_slots`), so it travels with the token's keys and values: copy-on-write
copies a block's mass with its bytes, and `compact` moves it with the tokens a row keeps.

    mass[layer]   [num_blocks * block_size, kv_heads]  fp32, slot-major
    slots         [tokens] int64: slot of each of a sequence's first tokens (`token_slots`)
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

    storages: per-slot tensors `[num_slots, kv_heads, ...]` (keys, values, attention mass) written in place.
    slots: `[length]` int64, the row's slots in token order; keep: `[kv_heads, kept]` int64 token indices,
    ascending per head. Afterwards slot `slots[i]` holds, per head, the i-th kept token.
    """
    kept = keep.shape[-1]
    heads = torch.arange(keep.shape[0], device=slots.device)
    source = slots[keep.to(slots.device)].T  # [kept, kv_heads]: the slot of each kept token, per head
    for storage in storages:
        storage[slots[:kept]] = storage[source, heads]


class AttentionMass:
    """Accumulated attention per slot of a full-precision pool, for every layer.

    Args:
        num_layers: layers of the store; num_slots: `num_blocks * block_size` of its pool.
        kv_heads: KV heads per layer; block_size: tokens per block; device: the pool's device.
    """

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self._mass = [torch.zeros(num_slots, kv_heads, device=device) for _ in range(num_layers)]

    def storage(self, layer: int) -> torch.Tensor:
        """`[num_slots, kv_heads]` fp32 of `layer`, for `compact`."""
        return self._mass[layer]

    def clear(self, layer: int, slots: torch.Tensor) -> None:
        """New tokens in `slots` (`[n]` int64) have received no attention yet."""
        self._mass[layer][slots] = 0

    def add(self, layer: int, slots: torch.Tensor, mass: torch.Tensor) -> None:
        """Add `mass` `[kv_heads, tokens]` (any float dtype; tokens = len(slots)) to the tokens in `slots`."""
        self._mass[layer].index_add_(0, slots, mass.T.float())

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Accumulated attention of the tokens in `slots`: `[kv_heads, tokens]` fp32."""
        return self._mass[layer][slots].T

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src`'s mass to block `dst` in every layer (copy-on-write of its keys and values)."""
        size = self.block_size
        for mass in self._mass:
            mass[dst * size : (dst + 1) * size] = mass[src * size : (src + 1) * size]
